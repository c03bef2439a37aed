"""int8 weight products for a portable export, written by ONNX Runtime's own quantization tool.

``quantize_int8`` takes the float graph and returns it with every weight product in int8 except the parts of the
LSH hashing path the ``Quantization`` keeps in float:

1. ``Gemm`` -> ``MatMul`` + ``Add``. The float export writes the feed-forward and LM-head products as row-major
   ``Gemm`` (ONNX Runtime fuses bias and activation into it), but dynamic quantization handles ``MatMul`` only.
2. ``onnxruntime.quantization.quantize_dynamic`` on every ``MatMul`` whose weight is a constant: int8 weights with
   one scale per output channel (the tool stores them in 7 bits, its ``reduce_range`` for ``MatMulInteger``),
   activations quantized to uint8 per tensor when the graph runs. It writes standard ops (``DynamicQuantizeLinear``,
   ``MatMulInteger``, ``Cast``, ``Mul``), so the file stays portable; ONNX Runtime's CPU provider fuses each group
   into one int8 kernel when it loads the file.
3. When the rotation products are to be quantized too (``fp32`` without "rotations"), their weight is first made an
   initializer of its own where the tracer left it a ``Reshape`` of the rotations buffer inside the hashed branch
   (the tool quantizes constant weights only), then a second pass quantizes them with one scale per tensor: the
   weight is 3-D ([H, D, n_hashes * rot/2]) and ONNX Runtime's fused int8 kernel rejects per-channel zero points for
   it at run time.

Which nodes are the hashing parts is read from the tracer's node metadata (``hashing_nodes``, called before the
exporter strips it): the shared query/key projection of each LSH layer is the ``MatMul`` the tracer scoped to a
module named ``...self_attention.query_key``; the rotation product is the one ``MatMul`` inside each LSH layer's
hashed branch whose weight is a constant -- the rotations buffer, or a ``Reshape`` of it.

Known limits: weights only (no calibration; static quantization of activations was not adopted, see README "int8");
the attention's own products (scores, weighted values) have no constant operand and stay float, as do layer norms
and softmax.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import heapq
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from reformer_rt.models import ReformerConfig

from .errors import ExportError
from .metadata import QUANTIZED_PRODUCT, Quantization, all_nodes

#: The tracer's node metadata entry that holds the module path of each node (a Python list literal).
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_QUERY_KEY_MODULE = ".self_attention.query_key"
_LARGE_BYTES = 2**31 - 2**24  # over this the tool must write external data


def hashing_nodes(proto: onnx.ModelProto, config: ReformerConfig) -> dict[str, tuple[str, ...]]:
    """The names of each ``HASHING_PARTS`` part's weight-product nodes in a traced portable graph (its node
    metadata still present): one per LSH layer and part."""
    weights = {init.name: init for init in proto.graph.initializer}
    rotations, query_key = [], []
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm") and _module_of(node).endswith(_QUERY_KEY_MODULE):
            query_key.append(node.name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                rotations += [n.name for n in all_nodes(attr.g)
                              if n.op_type == "MatMul" and _constant_weight(n, attr.g, weights) is not None]
    layers = config.attn_layers.count("lsh")
    found = {"rotations": tuple(rotations), "query_key": tuple(query_key)}
    if any(len(names) != layers for names in found.values()):
        raise RuntimeError(f"exporter bug: found {({k: len(v) for k, v in found.items()})} hashing products in the "
                           f"traced graph; expected {layers} of each (one per LSH layer)")
    return found


def _constant_weight(node: onnx.NodeProto, branch: onnx.GraphProto,
                     weights: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The value of ``node``'s second input when it is a constant: an initializer of the outer graph, or a
    ``Reshape`` in ``branch`` of one to a constant shape (None otherwise)."""
    if node.input[1] in weights:
        return numpy_helper.to_array(weights[node.input[1]])
    reshape = next((n for n in branch.node if node.input[1] in n.output and n.op_type == "Reshape"), None)
    if reshape is None or reshape.input[0] not in weights or reshape.input[1] not in weights:
        return None
    value = numpy_helper.to_array(weights[reshape.input[0]])
    shape = [dim or value.shape[axis] for axis, dim in enumerate(numpy_helper.to_array(weights[reshape.input[1]]))]
    return value.reshape(shape)  # ONNX Reshape: 0 copies the input's dimension, -1 is inferred


def fold_rotation_weights(proto: onnx.ModelProto, rotations: tuple[str, ...]) -> None:
    """Give each rotation product (by node name) its weight as an initializer of its own, in place, where the tracer
    left it a ``Reshape`` inside the hashed branch: ONNX Runtime's quantizer takes constant weights only."""
    weights = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            for inner in all_nodes(attr.g):
                if inner.name in rotations and inner.input[1] not in weights:
                    value = _constant_weight(inner, attr.g, weights)
                    assert value is not None, f"{inner.name}: its weight is not a constant"
                    name = f"{inner.name}__weight"
                    proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
                    inner.input[1] = name


def _module_of(node: onnx.NodeProto) -> str:
    """The module the tracer scoped ``node`` to ('' when it recorded none)."""
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def quantize_int8(proto: onnx.ModelProto, hashing: dict[str, tuple[str, ...]], quantization: Quantization,
                  workdir: Path) -> tuple[onnx.ModelProto, Quantization]:
    """``proto`` with int8 weight products (module docstring), and ``quantization`` completed with what was done.
    ``hashing`` is ``hashing_nodes``' answer for the same graph; ``workdir`` holds the tool's files."""
    try:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ExportError("quantize: needs onnxruntime's quantization tools; pip install onnxruntime") from exc
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # the caller's float graph stays as it was
    gemms_as_matmuls(proto.graph)
    if "rotations" not in quantization.fp32:
        fold_rotation_weights(proto, hashing["rotations"])
    kept = [name for part in quantization.fp32 for name in hashing[part]]
    large = proto.ByteSize() > _LARGE_BYTES
    source, target = workdir / "float.onnx", workdir / "int8.onnx"
    onnx.save_model(proto, str(source), save_as_external_data=large, location="float.onnx.data")
    common = dict(op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, use_external_data_format=large)
    with _quiet_tool():
        quantize_dynamic(source, target, per_channel=True, nodes_to_exclude=[*kept, *hashing["rotations"]], **common)
        if "rotations" not in quantization.fp32:
            source, target = target, workdir / "int8-rotations.onnx"
            quantize_dynamic(source, target, per_channel=False, nodes_to_quantize=list(hashing["rotations"]),
                             extra_options={"EnableSubgraph": True}, **common)
    quantized = onnx.load(str(target))
    sort_topologically(quantized.graph)
    products = sum(node.op_type == QUANTIZED_PRODUCT for node in all_nodes(quantized.graph))
    done = dataclasses.replace(quantization, products=products,
                               tool=f"onnxruntime.quantization.quantize_dynamic {onnxruntime.__version__}")
    return quantized, done


def gemms_as_matmuls(graph: onnx.GraphProto) -> int:
    """Rewrite each ``Gemm`` with a constant weight, ``transA=0`` and ``alpha=beta=1`` as ``MatMul`` (weight stored
    [K, N]) + ``Add`` of its bias, in place; returns how many. Same products, in a form dynamic quantization takes."""
    weights = {init.name: init for init in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}__kn"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T if attrs.get("transB", 0)
                                                                              else weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}__product" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}__bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in all_nodes(graph) for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return rewritten


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes so each comes after the producers of everything it reads, the values its subgraphs
    read from the outer scope included (the tool's own sort ignores those, and puts an LSH layer's ``If`` before
    the node that makes its input). Stable: nodes already in order keep it."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    needs = []
    for node in graph.node:
        names = {*node.input, *(name for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH
                                for inner in all_nodes(attr.g) for name in inner.input)}
        needs.append({producer[name] for name in names if name in producer})
    waiting = [len(need) for need in needs]
    users: list[list[int]] = [[] for _ in graph.node]
    for index, need in enumerate(needs):
        for other in need:
            users[other].append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    placed = []
    while ready:  # Kahn's algorithm, lowest original index first
        index = heapq.heappop(ready)
        placed.append(index)
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(placed) != len(graph.node):
        raise RuntimeError("quantized graph: its nodes form a cycle")
    nodes = [graph.node[index] for index in placed]
    del graph.node[:]
    graph.node.extend(nodes)


@contextlib.contextmanager
def _quiet_tool() -> Iterator[None]:
    """The tool logs advice on the root logger ("consider pre-processing") for every call; errors still pass."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
