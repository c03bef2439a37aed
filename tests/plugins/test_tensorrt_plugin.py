"""The TensorRT plugin module: its pure helpers, its source checked against the op contract, and the ONNX node
as TensorRT's ONNX parser will map it onto the plugin.

Without TensorRT (CI) the module's import stops with an ImportError right after its pure helpers; ``_plugin()``
executes it that far and keeps the namespace, so the helpers are tested exactly as the plugin uses them. The
decorated TensorRT functions are checked from the source (names, annotations, order), since they cannot be defined
here. Tests marked ``tensorrt``/``gpu`` run the registered plugin for real and are skipped with a reason elsewhere.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers.artifacts import Artifacts, TinyModel
from onnx import AttributeProto, TensorProto

from reformer_rt.models import ConfigError, ReformerConfig, ReformerLM
from reformer_rt.models.attention import lsh_attrs
from reformer_rt.models.lsh import (
    ATTRIBUTE_NAMES, ATTRIBUTES, INPUTS, ONNX_DOMAIN, OP_ID, OP_NAME, OP_NAMESPACE, OP_VERSION, PLUGIN_ATTRIBUTES,
    PLUGIN_NAMESPACE_ATTR, PLUGIN_VERSION_ATTR, TENSORRT_INSTALL_HINT, LSHAttrs, lsh_attention_reference,
    make_rotations,
)
from reformer_rt.runtime import engine_builder
from reformer_rt.runtime.errors import BackendUnavailable

MODULE = "reformer_rt.plugins.tensorrt_plugin"
SOURCE = Path(importlib.util.find_spec(MODULE).origin)  # type: ignore[arg-type, union-attr]


def _tensorrt_version() -> str | None:
    try:
        return engine_builder.import_tensorrt().__version__
    except BackendUnavailable:
        return None


HAVE_TENSORRT = _tensorrt_version() is not None


@functools.cache
def _plugin() -> tuple[types.ModuleType, str | None]:
    """(module namespace, ImportError message or None when TensorRT is installed and the import succeeded)."""
    if HAVE_TENSORRT:
        return importlib.import_module(MODULE), None
    spec = importlib.util.find_spec(MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        return module, str(exc)
    raise AssertionError(f"{MODULE} imported although TensorRT is not usable here")


def _require_tensorrt_gpu() -> types.ModuleType:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not HAVE_TENSORRT:
        pytest.skip("'tensorrt' imports but is not a usable TensorRT (e.g. type stubs only)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return engine_builder.import_tensorrt()


# ------------------------------------------------------------------------------------------- import behaviour
def test_import_without_tensorrt_says_what_to_install() -> None:
    if HAVE_TENSORRT:
        pytest.skip(f"TensorRT {_tensorrt_version()} is installed: the import succeeds")
    with pytest.raises(ImportError) as info:
        importlib.import_module(MODULE)
    message = str(info.value)
    assert 'pip install "tensorrt-cu12>=10.8"' in message and "tensorrt-cu13" in message
    assert "tensorrt.plugin" in message and MODULE not in sys.modules
    assert _plugin()[1] == message


def test_nothing_else_imports_the_plugin_or_tensorrt() -> None:
    code = (
        "import sys\n"
        "import reformer_rt.models, reformer_rt.export, reformer_rt.plugins\n"
        "import reformer_rt.runtime.session, reformer_rt.runtime.engine_builder, reformer_rt.runtime.commands.doctor\n"
        "import reformer_rt.runtime.tensorrt_backend, reformer_rt.runtime.commands.build\n"
        "from reformer_rt.runtime.commands import cli\n"
        "cli.build_parser()\n"
        f"assert {MODULE!r} not in sys.modules, 'plugin imported eagerly'\n"
        "assert 'tensorrt' not in sys.modules, 'tensorrt imported eagerly'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_install_hint_has_one_home() -> None:
    """The plugin and the engine builder ask for TensorRT with the contract's words; no other source spells them."""
    assert _plugin()[0].TENSORRT_INSTALL_HINT is engine_builder.TENSORRT_INSTALL_HINT is TENSORRT_INSTALL_HINT
    package = SOURCE.parents[1]
    spelled = [path.relative_to(package).as_posix() for folder in ("models", "plugins", "export", "runtime")
               for path in sorted((package / folder).rglob("*.py")) if "tensorrt-cu13>=" in path.read_text("utf-8")]
    assert spelled == ["models/lsh.py"]


# ------------------------------------------------------------------------------------ source vs the contract
def _tree() -> ast.Module:
    return ast.parse(SOURCE.read_text(encoding="utf-8"))


def _registrations() -> dict[str, ast.FunctionDef]:
    """{'register' | 'autotune' | 'impl' | ...: the function passed to ``trtp.<that>(PLUGIN_ID)(fn)``}."""
    tree = _tree()
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)
                and isinstance(node.func.func, ast.Attribute) and isinstance(node.func.func.value, ast.Name)
                and node.func.func.value.id == "trtp"):
            assert [ast.unparse(a) for a in node.func.args] == ["PLUGIN_ID"]
            found[node.func.func.attr] = functions[ast.unparse(node.args[0])]
    return found


def test_registers_register_autotune_impl_and_no_aot() -> None:
    assert set(_registrations()) == {"register", "autotune", "impl"}


@pytest.mark.parametrize(("api", "expected_name", "tensor_type"), [
    ("register", "REGISTER_PARAMETERS", "trtp.TensorDesc"),
    ("autotune", "AUTOTUNE_PARAMETERS", "trtp.TensorDesc"),
    ("impl", "IMPL_PARAMETERS", "trtp.Tensor"),
])
def test_decorated_functions_follow_the_contract(api: str, expected_name: str, tensor_type: str) -> None:
    fn = _registrations()[api]
    names = tuple(a.arg for a in fn.args.args)
    assert names == getattr(_plugin()[0], expected_name)
    assert not (fn.args.vararg or fn.args.kwarg or fn.args.defaults or fn.args.kwonlyargs)
    annotations = {a.arg: ast.unparse(a.annotation) for a in fn.args.args if a.annotation is not None}
    assert len(annotations) == len(names), "TensorRT needs every parameter annotated"
    for spec in INPUTS:
        assert annotations[spec.name] == tensor_type
    for name in ATTRIBUTE_NAMES:
        if name in annotations:
            assert annotations[name] == "Int32Array"  # one-element arrays: no int() on fields (NumPy >= 2.4)
    if "outputs" in annotations:
        assert annotations["outputs"] == f"tuple[{tensor_type}]"
    returns = {"register": "trtp.TensorDesc", "autotune": "list[trtp.AutoTuneCombination]", "impl": "None"}
    assert ast.unparse(fn.returns) == returns[api]


def test_annotations_are_objects_not_strings() -> None:
    """TensorRT checks annotations with issubclass: a ``from __future__`` import would turn them into strings."""
    tree = _tree()
    futures = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert futures == []


def test_contract_strings_are_not_repeated() -> None:
    strings = {n.value for n in ast.walk(_tree()) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    contract = {OP_ID, OP_NAME, OP_NAMESPACE, PLUGIN_NAMESPACE_ATTR, PLUGIN_VERSION_ATTR, *ATTRIBUTE_NAMES,
                *(spec.name for spec in INPUTS)}
    assert strings & contract == set()


def test_parameter_lists_and_version() -> None:
    plugin = _plugin()[0]
    inputs = tuple(spec.name for spec in INPUTS)
    assert plugin.PLUGIN_ID == OP_ID
    assert plugin.REGISTER_PARAMETERS == inputs + ATTRIBUTE_NAMES
    assert plugin.AUTOTUNE_PARAMETERS == (*inputs, "outputs")
    assert plugin.IMPL_PARAMETERS == (*inputs, *ATTRIBUTE_NAMES, "outputs", "stream")
    assert plugin.plugin_version() == PLUGIN_ATTRIBUTES[PLUGIN_VERSION_ATTR] == "1"


def test_check_signature() -> None:
    check = _plugin()[0].check_signature

    def good(qk, v, rotations, mask):  # noqa: ANN001
        return None

    def swapped(v, qk, rotations, mask):  # noqa: ANN001
        return None

    check(good, ("qk", "v", "rotations", "mask"))
    with pytest.raises(RuntimeError, match="swapped: parameters"):
        check(swapped, ("qk", "v", "rotations", "mask"))


# ------------------------------------------------------------------------------------------- pure helpers
def _fields(attrs: LSHAttrs) -> dict[str, np.ndarray]:
    """Fields as TensorRT's ONNX parser hands them to the plugin: INT -> one int32, INTS -> int32 array."""
    return {name: np.asarray(value, dtype=np.int32).reshape(-1) for name, value in attrs.as_dict().items()}


@pytest.mark.parametrize("attrs", [
    LSHAttrs(num_hashes=4, bucket_factors=(8,), chunk_length=64, chunks_before=1, causal=True),
    LSHAttrs(num_hashes=1, bucket_factors=(4, 16), chunk_length=32, chunks_before=1, chunks_after=1),
])
def test_attribute_decoding(attrs: LSHAttrs) -> None:
    decoded = _plugin()[0].lsh_attrs_from_fields(_fields(attrs))
    assert decoded == attrs and isinstance(decoded.causal, bool) and isinstance(decoded.bucket_factors, tuple)


@pytest.mark.parametrize(("change", "words"), [
    ({"num_hashes": np.array([1, 2], np.int32)}, "num_hashes: got int32 [1, 2]; expected one int"),
    ({"chunk_length": np.array([], np.int32)}, "chunk_length"),
    ({"causal": np.array([1.0], np.float32)}, "causal: got float32"),
    ({"bucket_factors": np.array([3], np.int32)}, "even"),
    ({"chunk_length": np.array([0], np.int32)}, "chunk_length"),
    ({"scale": np.array([1], np.int32)}, "unknown attributes"),
])
def test_attribute_decoding_errors(change: dict, words: str) -> None:
    fields = {**_fields(LSHAttrs(num_hashes=2, bucket_factors=(4,), chunk_length=8)), **change}
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        _plugin()[0].lsh_attrs_from_fields(fields)


def test_attribute_decoding_missing_field() -> None:
    fields = _fields(LSHAttrs(num_hashes=2, bucket_factors=(4,), chunk_length=8))
    del fields["chunks_after"]
    with pytest.raises(ConfigError, match="'chunks_after' is missing"):
        _plugin()[0].lsh_attrs_from_fields(fields)


def test_autotune_combinations() -> None:
    plugin = _plugin()[0]
    assert plugin.autotune_type_combinations() == [("FP32", "FP32", "FP32", "INT32", "FP32"),
                                                   ("FP16", "FP16", "FP32", "INT32", "FP16")]
    assert plugin.autotune_io_types() == "FP32|FP16, FP32|FP16, FP32, INT32, FP32|FP16"
    assert plugin.AUTOTUNE_LAYOUTS == "LINEAR"


@pytest.mark.parametrize(("types_", "expected"), [
    (("FP32", "FP32", "FP32", "INT32"), "FP32"),
    (("FP16", "FP16", "FP32", "INT32"), "FP16"),
])
def test_output_rule(types_: tuple[str, ...], expected: str) -> None:
    assert _plugin()[0].output_rule((4, 4, 4, 2), types_) == expected


@pytest.mark.parametrize(("ranks", "types_", "words"), [
    ((4, 4, 4, 2), ("FP16", "FP32", "FP32", "INT32"), "input types"),
    ((4, 4, 4, 2), ("FP32", "FP32", "FP32", "INT64"), "the mask int32"),
    ((4, 4, 4, 2), ("FP16", "FP16", "FP16", "INT32"), "rotations stay float32"),
    ((3, 4, 4, 2), ("FP32", "FP32", "FP32", "INT32"), "input ranks"),
])
def test_output_rule_rejects(ranks: tuple[int, ...], types_: tuple[str, ...], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        _plugin()[0].output_rule(ranks, types_)


# ------------------------------------------------------------------------------- the ONNX node, as parsed
CONFIG = ReformerConfig(vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                        attn_layers=("lsh", "local", "lsh"), feed_forward_size=64, axial_pos_embds=False,
                        max_position_embeddings=64, lsh_attn_chunk_length=8, local_attn_chunk_length=8,
                        num_hashes=2, num_buckets=[2, 4], hash_seed=3, is_decoder=True, lsh_num_chunks_after=1)
PLUGIN_LM = TinyModel("plugin-lm", CONFIG)


@pytest.mark.parametrize(("dtype", "token"), [("float32", "FP32"), ("float16", "FP16")])
def test_onnx_node_is_what_the_parser_maps_to_the_plugin(artifacts: Artifacts, dtype: str, token: str) -> None:
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(artifacts.export(PLUGIN_LM, "plugin", dtype))))
    plugin = _plugin()[0]
    nodes = [n for n in proto.graph.node if n.op_type == OP_NAME]
    assert len(nodes) == CONFIG.attn_layers.count("lsh")
    assert {(o.domain, o.version) for o in proto.opset_import} >= {(ONNX_DOMAIN, OP_VERSION)}
    types_ = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.value_info, *proto.graph.input)}
    initializers = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    expected_attrs = lsh_attrs(ReformerLM(CONFIG).config)
    onnx_tokens = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.INT32: "INT32"}
    for node in nodes:
        assert node.domain == ONNX_DOMAIN and len(node.input) == len(INPUTS) and len(node.output) == 1
        attrs = {a.name: a for a in node.attribute}
        # op_type = plugin name; plugin_namespace / plugin_version are STRING attributes (an INT version fails).
        assert attrs[PLUGIN_NAMESPACE_ATTR].type == AttributeProto.STRING
        assert attrs[PLUGIN_NAMESPACE_ATTR].s.decode() + "::" + node.op_type == plugin.PLUGIN_ID
        assert attrs[PLUGIN_VERSION_ATTR].type == AttributeProto.STRING
        assert attrs[PLUGIN_VERSION_ATTR].s.decode() == plugin.QDP_VERSION
        contract = {a.name: a for a in node.attribute if a.name not in PLUGIN_ATTRIBUTES}
        kinds = {"INT": AttributeProto.INT, "INTS": AttributeProto.INTS}  # -> one int32 field / int32 array
        assert {n: a.type for n, a in contract.items()} == {spec.name: kinds[spec.kind] for spec in ATTRIBUTES}
        fields = {n: np.asarray(onnx.helper.get_attribute_value(a), np.int32).reshape(-1) for n, a in contract.items()}
        assert plugin.lsh_attrs_from_fields(fields) == expected_attrs
        qk, v, rotations, mask = node.input
        rot = initializers[rotations]  # a constant input: fp32 rotations fixed at export
        assert rot.data_type == TensorProto.FLOAT
        assert tuple(rot.dims) == expected_attrs.rotations_shape(CONFIG.num_attention_heads,
                                                                 CONFIG.attention_head_size)
        assert producers[mask].op_type == "Cast"
        tokens = [onnx_tokens[types_[qk]], onnx_tokens[types_[v]], "FP32", onnx_tokens[types_[mask]]]
        assert tokens == [token, token, "FP32", "INT32"]
        assert plugin.output_rule((4, 4, 4, 2), tokens) == token  # a combination autotune offers


# ------------------------------------------------------------------------------ with TensorRT and a GPU
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_creator_is_in_the_registry() -> None:
    trt = _require_tensorrt_gpu()
    importlib.import_module(MODULE)
    creator = trt.get_plugin_registry().get_creator(OP_NAME, PLUGIN_ATTRIBUTES[PLUGIN_VERSION_ATTR], OP_NAMESPACE)
    assert creator is not None


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("length", [16, 64])  # L <= chunk_length (full attention) and the hashed path
def test_plugin_layer_matches_the_reference(dtype: torch.dtype, length: int) -> None:
    trt = _require_tensorrt_gpu()
    import tensorrt.plugin as trtp

    importlib.import_module(MODULE)
    attrs = LSHAttrs(num_hashes=2, bucket_factors=(4,), chunk_length=16, chunks_before=1, causal=True)
    generator = torch.Generator().manual_seed(0)
    qk, v = (torch.randn(2, 2, length, 32, generator=generator) for _ in range(2))
    mask = torch.ones(2, length, dtype=torch.int32)
    mask[1, length // 2:] = 0
    rotations = make_rotations(0, 2, 32, attrs)
    expected = lsh_attention_reference(qk.to(dtype).float(), v.to(dtype).float(), rotations, mask, attrs)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = engine_builder.strong_typing_flags(trt.__version__, trt.NetworkDefinitionCreationFlag.__members__)
    network = builder.create_network(sum(1 << int(getattr(trt.NetworkDefinitionCreationFlag, f)) for f in flags))
    trt_type = trt.float32 if dtype == torch.float32 else trt.float16
    qk_in = network.add_input("qk", trt_type, tuple(qk.shape))
    v_in = network.add_input("v", trt_type, tuple(v.shape))
    mask_in = network.add_input("mask", trt.int32, tuple(mask.shape))
    weights = np.ascontiguousarray(rotations.numpy())
    rotations_in = network.add_constant(weights.shape, trt.Weights(weights)).get_output(0)
    op = getattr(getattr(trtp.op, OP_NAMESPACE), OP_NAME)
    layer = network.add_plugin(op(qk_in, v_in, rotations_in, mask_in, **_fields(attrs)))
    out = layer.get_output(0)
    out.name = "out"
    network.mark_output(out)
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    assert serialized is not None
    context = trt.Runtime(logger).deserialize_cuda_engine(serialized).create_execution_context()
    tensors = {"qk": qk.to(dtype).cuda(), "v": v.to(dtype).cuda(), "mask": mask.cuda(),
               "out": torch.empty(qk.shape, dtype=dtype, device="cuda")}
    for name, tensor in tensors.items():
        assert context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    got = tensors["out"].float().cpu()
    valid = mask.bool()[:, None, :, None].expand_as(got)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2 * float(expected.abs().max())
    assert float((got - expected)[valid].abs().max()) <= tolerance
