"""int8 export (``export_onnx(..., quantize="int8")``): ONNX Runtime's dynamic quantization of the portable graph,
its metadata, the hashing path kept float, and validation by task metrics on text that fails past its limit.

The shared byte-level LM (``helpers/artifacts.py``) is exported once with int8 for the whole test session; the
tests that export it again with other options reuse one trace of it (``_traced``: everything after the trace --
quantization, metadata, saving, validation -- runs for real), so the module traces the model once more, not once
per test.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from helpers.artifacts import BYTE_LM, Artifacts, byte_lm_checkpoint, byte_lm_export

from reformer_rt.export import (
    ExportError, ExportReport, QualityCheck, Quantization, ValidationError, export_info, export_onnx, load_source, lowering,
    read_metadata,
)
from reformer_rt.export.metadata import HASHING_PARTS, all_nodes
from reformer_rt.export.quality import graph_forward, torch_forward
from reformer_rt.export.quantize import gemms_as_matmuls, hashing_nodes, quantize_int8
from reformer_rt.models import InputError, ReformerModel
from reformer_rt.runtime.commands import cli


CONFIG = BYTE_LM.config


def tiny_int8_report(artifacts: Artifacts) -> ExportReport:
    return artifacts.export_report(BYTE_LM, quantize="int8")


@functools.cache
def _traced(artifacts: Artifacts) -> bytes:
    model = load_source(byte_lm_checkpoint(artifacts))
    return lowering.trace(model, "portable", "float32", CONFIG.max_position_embeddings, 18).SerializeToString()


@pytest.fixture
def retraced(artifacts: Artifacts, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny checkpoint, whose next exports reuse one trace of it."""
    traced = _traced(artifacts)
    monkeypatch.setattr(lowering, "trace", lambda *args, **kwargs: onnx.ModelProto.FromString(traced))
    return byte_lm_checkpoint(artifacts)


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in all_nodes(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int8_export_quantizes_weights_keeps_hashing_float_and_reports_task_metrics(artifacts: Artifacts) -> None:
    report = tiny_int8_report(artifacts)
    model = onnx.load(str(report.path))
    ops = _ops(model)
    # 1 local layer (q, k, v, out, 2 feed-forward), 1 LSH layer (value, out, 2 feed-forward), the LM head
    assert report.quantization == Quantization("int8", HASHING_PARTS, 11, report.quantization.tool)
    assert ops["MatMulInteger"] == 11 and ops["DynamicQuantizeLinear"] >= 1 and "Gemm" not in ops
    assert {node.domain for node in all_nodes(model.graph)} == {""}  # standard ops only: still the portable form
    assert export_info(report.path).quantization == report.quantization
    assert read_metadata(report.path)["export_options"]["quantize"]["fp32"] == ["rotations", "query_key"]
    weights = {init.name for init in model.graph.initializer}
    branches = [attr.g for node in model.graph.node if node.op_type == "If" for attr in node.attribute]
    rotation_products = [n for g in branches for n in all_nodes(g) if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(rotation_products) == CONFIG.attn_layers.count("lsh")  # hashing stays a float product
    assert report.validation is not None and report.validation.passed  # the float graph, before quantization
    quality = report.quality
    assert quality is not None and quality.passed and "held-out Python source" in quality.source
    comparison = quality.comparison
    assert comparison.increase <= quality.limit and 0.9 <= comparison.top1_agreement <= 1.0
    assert comparison.bucket_agreement is not None and len(comparison.bucket_agreement_per_layer) == 1
    assert "bits per token" in report.summary() and "int8: 11 weight products" in report.summary()


def test_over_the_limit_fails_with_one_error_and_writes_nothing(retraced: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8.onnx"
    with pytest.raises(ValidationError, match=r"loses .* bits per token .* expected an increase <= -1"):
        export_onnx(retraced, out, quantize="int8", quality=QualityCheck(max_bpc_increase=-1.0), log=None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(cli, "COMMANDS", ("reformer_rt.runtime.commands.export",))
    code = cli.main(["export", str(retraced), "-o", str(out), "--quantize", "int8", "--max-bpc-increase", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--max-bpc-increase" in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_everything_quantized_puts_the_rotation_product_in_int8_and_runs(retraced: Path, tmp_path: Path) -> None:
    report = export_onnx(retraced, tmp_path / "all.onnx", quantize=Quantization("int8", ()), log=None)
    model = onnx.load(str(report.path))
    assert report.quantization is not None and report.quantization.fp32 == ()
    assert report.quantization.products == 11 + 2  # + the LSH layer's query/key projection and rotation product
    inner = [n.op_type for node in model.graph.node if node.op_type == "If" for attr in node.attribute
             for n in all_nodes(attr.g)]
    assert inner.count("MatMulInteger") == 1  # the rotation product, one scale per tensor
    assert report.quality is not None and report.quality.passed  # it ran in ONNX Runtime, hashed windows included


def test_validation_text_is_the_callers(retraced: Path, tmp_path: Path) -> None:
    text = "def f(x):\n    return x * 2\n" * 40
    ids = [b + 2 for b in text.encode()]
    report = export_onnx(retraced, tmp_path / "t.onnx", quantize="int8", log=None,
                         quality=QualityCheck(text=ids, source="f.py", windows=4))
    assert report.quality is not None and report.quality.source == "f.py" and report.quality.windows == 4


def test_int8_needs_the_float32_portable_graph_of_a_language_model(artifacts: Artifacts, tmp_path: Path) -> None:
    checkpoint = byte_lm_checkpoint(artifacts)
    with pytest.raises(ExportError, match="plugin"):
        export_onnx(checkpoint, tmp_path / "x.onnx", attention="plugin", quantize="int8")
    with pytest.raises(ExportError, match="float16"):
        export_onnx(checkpoint, tmp_path / "x.onnx", dtype="float16", quantize="int8")
    with pytest.raises(ExportError, match="language models"):
        export_onnx(ReformerModel(CONFIG), tmp_path / "x.onnx", quantize="int8")
    with pytest.raises(InputError, match="expected one of"):
        export_onnx(checkpoint, tmp_path / "x.onnx", quantize="int4")
    with pytest.raises(InputError, match="subset"):
        Quantization("int8", ("embeddings",))
    assert list(tmp_path.iterdir()) == []


def test_quantization_record_round_trips_and_float_files_have_none(artifacts: Artifacts) -> None:
    record = Quantization("int8", ("query_key", "rotations"), 7, "tool 1")
    assert record.fp32 == HASHING_PARTS  # one canonical order
    assert Quantization.from_json(record.to_json()) == record
    assert Quantization.from_json(None) is None
    assert export_info(byte_lm_export(artifacts)).quantization is None


def test_gemm_rewritten_as_matmul_gives_the_same_numbers() -> None:
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert gemms_as_matmuls(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    assert "w" not in {init.name for init in model.graph.initializer}  # the [N, K] weight is replaced by [K, N]
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_graph_bucket_ids_equal_the_models_in_float(artifacts: Artifacts) -> None:
    """The bucket probe of the validation copy reads the ids the graph hashes with: in float they are the model's."""
    model = load_source(byte_lm_checkpoint(artifacts))
    ids = np.random.default_rng(1).integers(2, 258, (2, 64), dtype=np.int64)
    logits, buckets = graph_forward(onnx.load(str(byte_lm_export(artifacts))))(ids)
    ref_logits, ref_buckets = torch_forward(model)(ids)
    assert len(buckets) == len(ref_buckets) == 1 and buckets[0].shape == (2, 2, 1, 64)
    np.testing.assert_array_equal(buckets[0], ref_buckets[0])
    assert np.abs(logits - ref_logits).max() < 1e-4


def test_a_rotation_weight_left_as_a_reshape_is_found_and_quantized(tmp_path: Path) -> None:
    """Larger rotation buffers reach the hashed branch as ``Reshape(rotations, shape)`` (the tracer folds small ones
    only): the rotation product is still found, and quantized when asked, from a weight folded out of the Reshape."""
    rng = np.random.default_rng(0)
    rotations, query_key = rng.standard_normal((4, 1, 3)).astype(np.float32), rng.standard_normal((4, 4))
    hashed = helper.make_graph(
        [helper.make_node("Reshape", ["rotations", "shape"], ["rotation_matrix"], name="reshape"),
         helper.make_node("MatMul", ["qk", "rotation_matrix"], ["rotated"], name="rotate")], "hashed", [],
        [helper.make_tensor_value_info("rotated", TensorProto.FLOAT, [None, 3])])
    short = helper.make_graph([helper.make_node("Slice", ["qk", "starts", "ends", "axes"], ["cut"], name="cut")],
                              "short", [], [helper.make_tensor_value_info("cut", TensorProto.FLOAT, [None, 3])])
    projection = helper.make_node("MatMul", ["x", "w_qk"], ["qk"], name="project")
    projection.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                                  value="['', 'model.layers.1.attention.self_attention.query_key', 'linear']")
    graph = helper.make_graph(
        [projection, helper.make_node("If", ["short_path"], ["out"], then_branch=short, else_branch=hashed)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4]),
         helper.make_tensor_value_info("short_path", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(rotations, "rotations"), numpy_helper.from_array(np.array([4, 3]), "shape"),
         numpy_helper.from_array(query_key.astype(np.float32), "w_qk"),
         *(numpy_helper.from_array(np.array([v]), n) for n, v in (("starts", 0), ("ends", 3), ("axes", 1)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    hashing = hashing_nodes(model, CONFIG)
    assert hashing == {"rotations": ("rotate",), "query_key": ("project",)}
    quantized, record = quantize_int8(model, hashing, Quantization("int8", ()), tmp_path)
    branch = next(a.g for node in quantized.graph.node if node.op_type == "If" for a in node.attribute
                  if a.name == "else_branch")
    inner = [node.op_type for node in branch.node]
    assert record.products == 2 and "MatMulInteger" in inner
    x = rng.standard_normal((5, 4)).astype(np.float32)
    feeds = {"x": x, "short_path": np.array(False)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(quantized.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, x @ query_key.astype(np.float32) @ rotations.reshape(4, 3), atol=0.2)
    np.testing.assert_allclose(want, x @ query_key.astype(np.float32) @ rotations.reshape(4, 3), rtol=1e-5, atol=1e-5)
