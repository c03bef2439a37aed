"""float16 graphs: keep the numerically sensitive reductions in float32 inside the graph.

TensorRT 11 builds strongly typed networks only, so the precision of every tensor must be decided in the ONNX
file. The exporter traces float16 weights and activations; this pass then wraps each softmax-like reduction
(``ReduceLogSumExp``, ``Softmax``, ``LogSoftmax``) whose input is float16 in ``Cast`` nodes so it accumulates in
float32, and pins ``LayerNormalization`` to float32 statistics (``stash_type=1``). The LSH lowerings need nothing
here: the portable form computes the op in float32 as the reference does, the plugin accumulates internally.

Types come from ONNX shape inference; a reduction whose input type cannot be inferred is left as it is.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

UPCAST_OPS = ("ReduceLogSumExp", "Softmax", "LogSoftmax")
LAYER_NORM = "LayerNormalization"


def upcast_reductions(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place (see module docstring); returns the number of reductions wrapped."""
    types = _inferred_types(model)
    return _rewrite_graph(model.graph, types)


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for graph in _graphs(inferred.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
    return types


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_graphs(attr.g))
    return found


def _rewrite_graph(graph: onnx.GraphProto, types: dict[str, int]) -> int:
    rewritten: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                count += _rewrite_graph(attr.g, types)
        if node.op_type == LAYER_NORM:
            _set_stash_type(node)
        if node.op_type in UPCAST_OPS and types.get(node.input[0]) == TensorProto.FLOAT16:
            rewritten.extend(_wrapped(node))
            count += 1
        else:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    return count


def _wrapped(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Cast(fp32) -> node -> Cast(fp16), keeping the node's output name for its consumers."""
    source, result = node.input[0], node.output[0]
    wide_in, wide_out = f"{source}__fp32_{node.name}", f"{result}__fp32"
    node.input[0], node.output[0] = wide_in, wide_out
    return [helper.make_node("Cast", [source], [wide_in], to=TensorProto.FLOAT, name=f"{node.name}__upcast"),
            node,
            helper.make_node("Cast", [wide_out], [result], to=TensorProto.FLOAT16, name=f"{node.name}__downcast")]


def _set_stash_type(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name == "stash_type":
            attr.i = TensorProto.FLOAT
            return
    node.attribute.append(helper.make_attribute("stash_type", TensorProto.FLOAT))
