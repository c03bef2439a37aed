"""Run plugin-form graphs in ONNX Runtime: the LSH node as a Python custom op calling the fp32 reference.

onnxruntime-extensions (``onnx_op``) dispatches a node of the contract's domain and op type to a Python function
on the CPU execution provider. Its attribute declarations take scalars and strings only -- an INTS attribute
cannot be declared, and undeclared attributes never reach the function. So validation runs on a *copy* of the
exported graph (``validation_copy``) in which each INTS attribute of the contract is re-encoded as a
comma-separated STRING of the same name; the exported file itself keeps the contract's INTS attribute that
TensorRT reads. The copy also carries ``QK_DTYPE_ATTR`` (the ONNX element type of qk) and feeds the op float32:
float16 inputs are cast up in the copy and back to float16 inside the function, so the reference sees exactly
the float16 values and applies the float16 mask constants, as a float16 plugin would.

Reference: onnxruntime-extensions ``onnxruntime_extensions.onnx_op`` / ``PyCustomOpDef``. Known limits: one
Python implementation per process (the registration is global), outputs cross into ONNX Runtime as Python
lists, so this is for validation on small inputs only.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from reformer_rt.models.lsh import (ATTRIBUTES, ONNX_DOMAIN, OP_NAME, PLUGIN_ATTRIBUTES, LSHAttrs,
                                    lsh_attention_reference)

from .errors import ExportError

#: Extra attribute of the validation copy: ONNX element type of qk (TensorProto.FLOAT or FLOAT16).
QK_DTYPE_ATTR = "validation_qk_dtype"
_TORCH_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16}
_library: list[str] = []


def custom_op_library() -> str:
    """Path of the onnxruntime-extensions library with the Python LSHAttention registered (once per process)."""
    if _library:
        return _library[0]
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as exc:
        raise ExportError("validating a plugin-form export needs onnxruntime-extensions "
                          "(pip install onnxruntime-extensions), or pass validate=False / --no-validate") from exc
    attrs = {spec.name: PyCustomOpDef.dt_int64 if spec.kind == "INT" else PyCustomOpDef.dt_string
             for spec in ATTRIBUTES}
    attrs.update({name: PyCustomOpDef.dt_string for name in PLUGIN_ATTRIBUTES})
    attrs[QK_DTYPE_ATTR] = PyCustomOpDef.dt_int64
    floats = PyCustomOpDef.dt_float
    onnx_op(op_type=f"{ONNX_DOMAIN}::{OP_NAME}", inputs=[floats, floats, floats, PyCustomOpDef.dt_int32],
            outputs=[floats], attrs=attrs)(_lsh_attention_numpy)
    _library.append(get_library_path())
    return _library[0]


def _lsh_attention_numpy(qk: np.ndarray, v: np.ndarray, rotations: np.ndarray, mask: np.ndarray,
                         **attributes: int | str) -> np.ndarray:
    for name, expected in PLUGIN_ATTRIBUTES.items():
        if attributes.get(name) != expected:
            raise ValueError(f"LSHAttention node: attribute {name}={attributes.get(name)!r}; expected {expected!r}")
    values = {spec.name: (tuple(int(x) for x in str(attributes[spec.name]).split(",")) if spec.kind == "INTS"
                          else int(attributes[spec.name])) for spec in ATTRIBUTES}
    dtype = _TORCH_DTYPES[int(attributes[QK_DTYPE_ATTR])]
    out = lsh_attention_reference(torch.from_numpy(qk).to(dtype), torch.from_numpy(v).to(dtype),
                                  torch.from_numpy(rotations), torch.from_numpy(mask), LSHAttrs(**values))
    return out.float().numpy()


def validation_copy(model: onnx.ModelProto, qk_dtype: int) -> onnx.ModelProto:
    """A copy of ``model`` whose LSH nodes the Python op can run (module docstring); ``model`` is unchanged."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _rewrite(copy.graph, qk_dtype)
    return copy


def _rewrite(graph: onnx.GraphProto, qk_dtype: int) -> None:
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rewrite(attr.g, qk_dtype)
        if node.domain != ONNX_DOMAIN or node.op_type != OP_NAME:
            nodes.append(node)
            continue
        _encode_attributes(node, qk_dtype)
        nodes.extend(_float32_io(node) if qk_dtype != TensorProto.FLOAT else [node])
    del graph.node[:]
    graph.node.extend(nodes)


def _encode_attributes(node: onnx.NodeProto, qk_dtype: int) -> None:
    lists = {spec.name for spec in ATTRIBUTES if spec.kind == "INTS"}
    for i, attr in enumerate(node.attribute):
        if attr.name in lists:
            node.attribute[i].CopyFrom(helper.make_attribute(attr.name, ",".join(str(x) for x in attr.ints)))
    node.attribute.append(helper.make_attribute(QK_DTYPE_ATTR, qk_dtype))


def _float32_io(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Cast qk and v up to float32 before the node and its output back to the original type after it."""
    casts = []
    for i in (0, 1):
        wide = f"{node.input[i]}__fp32_{node.name}"
        casts.append(helper.make_node("Cast", [node.input[i]], [wide], to=TensorProto.FLOAT))
        node.input[i] = wide
    result, wide_out = node.output[0], f"{node.output[0]}__fp32"
    node.output[0] = wide_out
    back = [attr.i for attr in node.attribute if attr.name == QK_DTYPE_ATTR][0]
    return [*casts, node, helper.make_node("Cast", [wide_out], [result], to=back)]
