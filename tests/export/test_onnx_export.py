"""ONNX export: both LSH lowerings x three architectures, validated in ONNX Runtime against PyTorch.

Checkpoints are random-weight transformers models written with ``save_pretrained`` (so every export is a round
trip from an HF directory): a shrunk crime-and-punishment layout (local/LSH alternating, axial positions,
factorized buckets), a small enwik8-like all-LSH decoder with 4 hashes, and an encoder (``is_decoder=False``)
attending to chunks after. Each (architecture, form, dtype) is exported once per module and shared.
"""

from __future__ import annotations

import functools
from pathlib import Path

import onnx
import pytest
import torch
from onnx import AttributeProto, TensorProto, numpy_helper

from reformer_rt.export import ExportError, ValidationError, export_onnx, read_metadata
from reformer_rt.export import validate as validation
from reformer_rt.models import OP_VERSION, ReformerLM, ReformerModel
from reformer_rt.models.lsh import ATTRIBUTES, ONNX_DOMAIN, OP_NAME, PLUGIN_ATTRIBUTES
from reformer_rt.models.presets import random_model
from reformer_rt.runtime.commands import cli

transformers = pytest.importorskip("transformers")

ARCHITECTURES = {
    "crime": dict(  # local/LSH alternating, axial, factorized buckets, causal
        vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
        attn_layers=["local", "lsh", "local", "lsh"], feed_forward_size=64, axial_pos_embds=True,
        axial_pos_shape=[8, 16], axial_pos_embds_dim=[8, 24], max_position_embeddings=128,
        lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_hashes=1, num_buckets=[4, 4], hash_seed=3,
        is_decoder=True),
    "enwik8": dict(  # all LSH, 4 hashes, plain positions, chunked feed-forward
        vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16, attn_layers=["lsh", "lsh"],
        feed_forward_size=64, axial_pos_embds=False, max_position_embeddings=256, lsh_attn_chunk_length=16,
        num_hashes=4, num_buckets=8, hash_seed=5, is_decoder=True, hidden_act="gelu",
        chunk_size_feed_forward=16),
    "encoder": dict(  # bidirectional, chunks after, different LSH / local chunk lengths
        vocab_size=50, hidden_size=32, num_attention_heads=2, attention_head_size=16, attn_layers=["lsh", "local"],
        feed_forward_size=64, axial_pos_embds=True, axial_pos_shape=[8, 16], axial_pos_embds_dim=[16, 16],
        max_position_embeddings=128, lsh_attn_chunk_length=8, local_attn_chunk_length=16, num_hashes=2,
        num_buckets=4, hash_seed=1, is_decoder=False, lsh_num_chunks_before=1, lsh_num_chunks_after=1,
        local_num_chunks_before=1, local_num_chunks_after=1),
}
FORMS = ("plugin", "portable")
#: The portable exports of 25-40 s each on 2 cores, marked ``slow``: ``make test`` leaves them to CI. It keeps the
#: encoder's float32 one (chunks after: no other portable export has them) and every plugin export (3-10 s).
SLOW_EXPORTS = {("crime", "portable", "float32"), ("enwik8", "portable", "float32"),
                ("encoder", "portable", "float16")}


def _exports(names: list[str], forms: tuple[str, ...], dtype: str = "float32") -> list:
    """(name, form) parameters, ``slow`` where the export is in ``SLOW_EXPORTS``."""
    return [pytest.param(name, form, id=f"{name}-{form}",
                         marks=[pytest.mark.slow] if (name, form, dtype) in SLOW_EXPORTS else [])
            for form in forms for name in names]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@functools.cache
def _checkpoint(root: Path, name: str) -> Path:
    config = transformers.ReformerConfig(**ARCHITECTURES[name])
    cls = transformers.ReformerModel if name == "encoder" else transformers.ReformerModelWithLMHead
    path = root / f"hf_{name}"
    random_model(config, cls, seed=sum(map(ord, name)), scale=0).save_pretrained(path)
    return path


@functools.cache
def _export(root: Path, name: str, form: str, dtype: str = "float32"):  # -> (report, ModelProto)
    out = root / f"{name}_{form}_{dtype}.onnx"
    report = export_onnx(_checkpoint(root, name), out, attention=form, dtype=dtype, log=None)
    return report, onnx.load(str(out))


def _torch_model(root: Path, name: str) -> ReformerLM | ReformerModel:
    cls = ReformerModel if name == "encoder" else ReformerLM
    return cls.from_pretrained(_checkpoint(root, name))


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
    return nodes


@pytest.mark.parametrize(("name", "form"), _exports(list(ARCHITECTURES), FORMS))
def test_export_validates_against_pytorch(workdir: Path, name: str, form: str) -> None:
    report, _ = _export(workdir, name, form)
    result = report.validation
    assert result is not None and result.ran and result.passed
    assert result.metric == "abs" and result.max_diff <= validation.FP32_ABS_TOL
    assert any(c.ragged and c.batch > 1 for c in result.cases)
    assert 1 in {c.length for c in result.cases} and len(result.cases) >= 4
    assert report.path.exists() and report.size_bytes == report.path.stat().st_size


@pytest.mark.parametrize(("name", "form"), _exports(list(ARCHITECTURES), FORMS))
def test_saved_file_runs_at_other_shapes(workdir: Path, name: str, form: str) -> None:
    """The file on disk (not the in-memory graph) at batch sizes and lengths the export never used."""
    report, proto = _export(workdir, name, form)
    m = _torch_model(workdir, name).config.chunk_multiple
    shapes = [(5, 2 * m + 7, True), (4, m, False), (1, report.max_length, False)]
    result = validation.validate(proto, _torch_model(workdir, name), form, "float32", shapes, seed=11)
    assert [(c.batch, c.length) for c in result.cases] == [(s[0], s[1]) for s in shapes]
    assert result.max_diff <= validation.FP32_ABS_TOL, result.cases


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_plugin_nodes_follow_the_op_contract(workdir: Path, name: str) -> None:
    _, proto = _export(workdir, name, "plugin")
    onnx.checker.check_model(proto)
    nodes = [n for n in _all_nodes(proto.graph) if n.domain == ONNX_DOMAIN]
    assert len(nodes) == ARCHITECTURES[name]["attn_layers"].count("lsh")
    assert {(o.domain, o.version) for o in proto.opset_import} >= {(ONNX_DOMAIN, OP_VERSION)}
    initializers = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    kinds = {"INT": AttributeProto.INT, "INTS": AttributeProto.INTS}
    for node in nodes:
        assert node.op_type == OP_NAME and node in proto.graph.node  # top level, no If around it
        attrs = {a.name: a for a in node.attribute}
        assert set(attrs) == {s.name for s in ATTRIBUTES} | set(PLUGIN_ATTRIBUTES)
        for spec in ATTRIBUTES:
            assert attrs[spec.name].type == kinds[spec.kind], spec.name
        for key, value in PLUGIN_ATTRIBUTES.items():
            assert attrs[key].type == AttributeProto.STRING and attrs[key].s.decode() == value
        qk, v, rotations, mask = node.input
        assert producers[qk].output and producers[v].output
        heads, head_dim = ARCHITECTURES[name]["num_attention_heads"], ARCHITECTURES[name]["attention_head_size"]
        assert rotations in initializers and initializers[rotations].data_type == TensorProto.FLOAT
        assert list(initializers[rotations].dims)[:2] == [heads, head_dim]
        cast = producers[mask]
        assert cast.op_type == "Cast" and {a.name: a.i for a in cast.attribute}["to"] == TensorProto.INT32


@pytest.mark.parametrize(("name", "form"), _exports(list(ARCHITECTURES), ("portable",)))
def test_portable_graph_uses_standard_ops_only(workdir: Path, name: str, form: str) -> None:
    _, proto = _export(workdir, name, form)
    onnx.checker.check_model(proto)
    assert {n.domain for n in _all_nodes(proto.graph)} <= {"", "ai.onnx"}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}


@pytest.mark.parametrize(("name", "form"), _exports(["crime"], FORMS))
def test_batch_and_length_axes_are_symbolic(workdir: Path, name: str, form: str) -> None:
    _, proto = _export(workdir, name, form)
    for value in (*proto.graph.input, proto.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param and not dims[0].dim_value and not dims[1].dim_value
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == TensorProto.INT64 for i in proto.graph.input)
    assert proto.graph.output[0].name == "logits"
    assert proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value == ARCHITECTURES[name]["vocab_size"]


def test_encoder_outputs_last_hidden_state(workdir: Path) -> None:
    _, proto = _export(workdir, "encoder", "plugin")
    assert proto.graph.output[0].name == "last_hidden_state"
    assert proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value == 2 * ARCHITECTURES["encoder"]["hidden_size"]


def test_metadata_records_config_and_options(workdir: Path) -> None:
    report, _ = _export(workdir, "crime", "plugin")
    meta = read_metadata(report.path)
    config = _torch_model(workdir, "crime").config
    assert meta["config"] == config.to_dict()
    assert meta["op_contract_version"] == str(OP_VERSION)
    assert meta["hash_seed"] == "3" and meta["num_buckets"] == [4, 4]
    assert meta["export_options"]["attention"] == "plugin" and meta["export_options"]["dtype"] == "float32"
    assert meta["export_options"]["padding"] == "in_graph" and meta["export_options"]["max_length"] == 128
    assert meta["package_version"]


@pytest.mark.parametrize(("name", "form"), [*_exports(["enwik8"], ("plugin",), "float16"),
                                           *_exports(["encoder"], ("portable",), "float16")])
def test_float16_graph(workdir: Path, name: str, form: str) -> None:
    report, proto = _export(workdir, name, form, "float16")
    onnx.checker.check_model(proto)
    floats = {t.name: t.data_type for t in proto.graph.initializer if len(t.dims) >= 1 and
              t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    # weights fp16; the rotations stay fp32 per the contract (as a buffer, or reshaped for the hashing MatMul)
    rotations = [b.flatten() for n, b in _torch_model(workdir, name).named_buffers() if n.endswith("rotations")]
    for init in proto.graph.initializer:
        if floats.get(init.name) == TensorProto.FLOAT:
            values = torch.from_numpy(numpy_helper.to_array(init).copy()).flatten()
            assert any(torch.equal(values, r) for r in rotations), f"{init.name} is a float32 weight"
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    producers = {o: n for n in _all_nodes(proto.graph) for o in n.output}
    for node in _all_nodes(proto.graph):
        if node.op_type == "LayerNormalization":
            assert {a.name: a.i for a in node.attribute}["stash_type"] == TensorProto.FLOAT
        if node.op_type == "ReduceLogSumExp" and node in proto.graph.node:
            up = producers[node.input[0]]
            assert up.op_type == "Cast" and {a.name: a.i for a in up.attribute}["to"] == TensorProto.FLOAT
    result = report.validation
    assert result is not None and result.ran and result.metric == "rel"
    assert result.max_diff <= validation.FP16_REL_TOL


def test_failed_validation_leaves_no_file(workdir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(validation, "FP32_ABS_TOL", -1.0)
    out = tmp_path / "model.onnx"
    with pytest.raises(ValidationError, match="differs from the PyTorch model"):
        export_onnx(_checkpoint(workdir, "encoder"), out, attention="plugin", log=None)
    assert list(tmp_path.iterdir()) == []


def test_model_object_source_and_bad_options(workdir: Path, tmp_path: Path) -> None:
    model = _torch_model(workdir, "encoder")
    with pytest.raises(ExportError, match="attention"):
        export_onnx(model, tmp_path / "x.onnx", attention="dense")
    with pytest.raises(ExportError, match="max_length"):
        export_onnx(model, tmp_path / "x.onnx", max_length=10**6)
    with pytest.raises(ExportError, match="non-float32"):
        export_onnx(model.half(), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def _cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    monkeypatch.setattr(cli, "COMMANDS", ("reformer_rt.export.cli",))
    return cli.main(argv)


def test_cli_missing_checkpoint(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert _cli(monkeypatch, ["export", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "nowhere" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["missing_dir", "under_a_file"])
def test_cli_unwritable_output(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path, where: str) -> None:
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
    out = tmp_path / ("missing" if where == "missing_dir" else "file") / "out.onnx"
    code = _cli(monkeypatch, ["export", str(_checkpoint(workdir, "encoder")), "-o", str(out), "--no-validate"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if where == "missing_dir" else ["file"])


def test_cli_exports(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                     tmp_path: Path) -> None:
    out = tmp_path / "enc.onnx"
    code = _cli(monkeypatch, ["export", str(_checkpoint(workdir, "encoder")), "-o", str(out), "--attention",
                              "plugin", "--max-length", "64"])
    assert code == 0 and out.exists()
    assert "max abs diff" in capsys.readouterr().out
    assert read_metadata(out)["export_options"]["max_length"] == 64
