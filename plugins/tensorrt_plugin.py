"""The LSH attention op as a TensorRT plugin: ``reformer_rt::LSHAttention`` for ``tensorrt.plugin`` (JIT).

Importing this module registers the plugin creator with TensorRT's plugin registry, so it must be imported before
an ONNX file is parsed and before an engine is deserialized (``reformer_rt.runtime.engine_builder`` and
``reformer_rt.runtime.tensorrt_backend`` do that). Nothing else in the package imports it. Without TensorRT the
import raises ImportError naming what to install.

The plugin is defined with TensorRT's Python "quickly deployable plugin" API (``tensorrt.plugin``, TensorRT 10.6+;
this project targets 10.8+ and 11.x), reading every name from the op contract (``reformer_rt.models.lsh``):

* ``register``: inputs ``qk, v, rotations, mask`` in contract order, then the contract attributes; the output is
  ``v.like()`` (shape and dtype of ``v``). Attributes are annotated ``npt.NDArray[np.int32]`` -- one element for
  an INT, any length for INTS -- because the ONNX parser hands INT attributes over as one-element INT32 fields,
  and TensorRT up to 11.1 converts fields annotated ``int`` with ``int(array)``, which NumPy >= 2.4 rejects
  (fixed in the 11.4 wheel). Arrays are passed through ``astype`` instead, on every version.
* ``autotune``: float32 and float16 for ``qk``/``v``/``out`` switching together, float32 rotations, int32 mask,
  LINEAR layouts (``autotune_io_types``). Engines are strongly typed, so the graph's types must be one of these.
* ``impl``: wraps TensorRT's buffers as torch tensors on TensorRT's stream and runs
  ``reformer_rt.plugins.lsh_triton.lsh_attention_triton`` -- the same launchers the torch op uses -- then copies
  the result into the output buffer.

TensorRT matches these functions by parameter NAME (``inspect.signature``) and by annotation OBJECT, so the
parameter lists below spell out the contract names (checked against the contract by ``check_signature`` before
registering), and this module must not use ``from __future__ import annotations`` (string annotations would fail
TensorRT's ``issubclass`` checks).

The pure pieces -- attribute decoding (``lsh_attrs_from_fields``), the autotune strings, the output rule and the
signature check -- come first and import no TensorRT, so they can be exercised on machines without it.

Why the engine needs Python, torch and Triton at run time (no ``aot_impl``)
---------------------------------------------------------------------------
An engine using this plugin stores only the plugin's name and attributes; at run time TensorRT calls back into
this module, which launches the Triton kernels through torch. So the engine runs only in a Python process that has
imported this module, with torch (CUDA build) and triton installed -- not in ``trtexec`` or a plain C++ program.
TensorRT's AOT path (``tensorrt.plugin.aot_impl``, 10.9+) would embed compiled kernels in the engine instead, but
its contract does not fit this op:

1. AOT allows exactly one kernel launch per type/format/tactic combination. The op is a pipeline: the hash kernel
   (bucket ids [B,H,n_hashes,L]), a stable sort of those ids (``torch.sort``, i.e. CUB's segmented radix sort,
   several launches), the attend kernel (per-round rows and logsumexp), and the combine kernel.
2. AOT has no workspace, while the pipeline needs scratch between the stages: bucket ids, the sort permutation,
   per-round outputs [B,H,n_hashes,L,D] and logsumexp [B,H,n_hashes,L].
3. AOT kernel arguments are the input pointers, int32 scalars, then the output pointers -- no strides and no
   float scalars -- while the attend kernel takes strides and float scalars (1/sqrt(D), the norm epsilon).
4. There is no Triton sort here to compile, and one launch cannot sort a 64K-512K segment per (b, h, round).
   TensorRT's own TopK stops at K = 3840.

An AOT port would take: splitting the op into a chain of ONNX nodes (hash -> sort -> attend -> combine) with the
intermediates as graph tensors (a new op-contract version and exporter change); a sort stage that is either a
multi-pass sort expressed as several single-kernel plugins or a C++ ``IPluginV3`` calling CUB with a workspace;
attend/combine kernels rewritten for contiguous inputs with only int32 scalars (floats as constexpr, one compiled
variant per head dim and dtype); every attribute declared in ``aot_impl`` in registration order (TensorRT passes all
of them positionally); and a check per Triton version that the compiled kernel has no extra scratch-pointer
parameters that TensorRT would not fill. The alternative with the same result -- engines without Python -- is one
C++ ``IPluginV3`` for the whole op (workspace, CUB sort, Triton kernels compiled ahead of time to cubins).

Known limits: one extra device copy of the output per call (the launcher allocates its result); CUDA-graph capture
of an engine using this plugin is untested; build-time timing runs ``impl`` on whatever the buffers hold, which is
safe because every gathered index comes from a sort permutation of [0, L), never from tensor data directly.
References: TensorRT's ``tensorrt.plugin`` API (``python/packaging/bindings_wheel/tensorrt/plugin`` in
NVIDIA/TensorRT) and ``samples/python/quickly_deployable_plugins``; onnx-tensorrt's plugin fallback
(``plugin_namespace`` / ``plugin_version`` node attributes).
"""

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from reformer_rt.models.errors import ConfigError
from reformer_rt.models.lsh import (
    ATTRIBUTE_NAMES, ATTRIBUTES, INPUTS, OP_ID, OUTPUTS, PLUGIN_ATTRIBUTES, PLUGIN_VERSION_ATTR, TENSORRT_INSTALL_HINT,
    TENSORRT_MIN_VERSION, LSHAttrs,
)

PLUGIN_ID = OP_ID
OP_INPUT_NAMES = tuple(spec.name for spec in INPUTS)
#: Parameter lists TensorRT expects, in order: tensors, attributes, then its own ``outputs`` / ``stream``.
REGISTER_PARAMETERS = OP_INPUT_NAMES + ATTRIBUTE_NAMES
AUTOTUNE_PARAMETERS = OP_INPUT_NAMES + ("outputs",)
IMPL_PARAMETERS = REGISTER_PARAMETERS + ("outputs", "stream")
#: ``tensorrt.plugin`` registers every creator as version "1"; the ONNX node's ``plugin_version`` must match.
QDP_VERSION = "1"
#: Contract dtype names -> type tokens of ``tensorrt.plugin.AutoTuneCombination``.
TYPE_TOKENS = {"float32": "FP32", "float16": "FP16", "int32": "INT32"}
AUTOTUNE_LAYOUTS = "LINEAR"

Int32Array = npt.NDArray[np.int32]


def plugin_version() -> str:
    """The contract's plugin version, which must be the one ``tensorrt.plugin`` registers."""
    version = PLUGIN_ATTRIBUTES[PLUGIN_VERSION_ATTR]
    if version != QDP_VERSION:
        raise RuntimeError(f"op contract plugin_version={version!r}, but tensorrt.plugin registers every plugin as "
                           f"version {QDP_VERSION!r}; a new contract version needs a new plugin name")
    return version


def check_signature(fn: Callable[..., object], expected: Sequence[str]) -> None:
    """Fail loudly if ``fn``'s parameter names drifted from the contract (TensorRT matches them by name)."""
    names = tuple(inspect.signature(fn).parameters)
    if names != tuple(expected):
        raise RuntimeError(f"{fn.__qualname__}: parameters {names}; expected {tuple(expected)} (the op contract's "
                           "inputs and attributes, in order, then TensorRT's own parameters)")


def lsh_attrs_from_fields(fields: Mapping[str, object]) -> LSHAttrs:
    """Decode plugin fields (int arrays: one element per INT, any length per INTS) into validated ``LSHAttrs``."""
    unknown = sorted(set(fields) - set(ATTRIBUTE_NAMES))
    if unknown:
        raise ConfigError(f"{PLUGIN_ID}: got unknown attributes {unknown}; expected only {list(ATTRIBUTE_NAMES)}")
    values: dict[str, Any] = {}
    for spec in ATTRIBUTES:
        if spec.name not in fields:
            raise ConfigError(f"{PLUGIN_ID}: attribute {spec.name!r} is missing; expected every contract attribute "
                              "(re-export the model with reformer-rt export --attention plugin)")
        array = np.asarray(fields[spec.name]).reshape(-1)
        if array.dtype.kind not in "iu" or array.size == 0 or (spec.kind == "INT" and array.size != 1):
            raise ConfigError(f"{PLUGIN_ID}.{spec.name}: got {array.dtype} {array.tolist()}; expected "
                              f"{'one int' if spec.kind == 'INT' else 'a non-empty int list'} ({spec.doc})")
        items = tuple(int(x) for x in array.tolist())
        values[spec.name] = items[0] if spec.kind == "INT" else items
    try:
        return LSHAttrs(**values)
    except ValueError as exc:
        raise ConfigError(f"{PLUGIN_ID}: invalid attributes in the model file: {exc}") from exc


def autotune_type_combinations() -> list[tuple[str, ...]]:
    """Supported type tokens per I/O position (inputs, then outputs): float dtypes switch together."""
    specs = INPUTS + OUTPUTS
    widths = {len(spec.dtypes) for spec in specs if len(spec.dtypes) > 1}
    if len(widths) > 1:
        raise RuntimeError(f"op contract: multi-dtype I/O lists of different lengths {widths}; cannot pair them")
    width = widths.pop() if widths else 1
    return [tuple(TYPE_TOKENS[spec.dtypes[i] if len(spec.dtypes) > 1 else spec.dtypes[0]] for spec in specs)
            for i in range(width)]


def autotune_io_types() -> str:
    """The ``AutoTuneCombination`` type string: ``|`` marks a choice every ``|`` position makes together."""
    columns = zip(*autotune_type_combinations())
    return ", ".join("|".join(column) if len(set(column)) > 1 else column[0] for column in columns)


def contract_ranks() -> tuple[int, ...]:
    """Rank of each input, from the contract's shape strings ("[B,H,L,D]" -> 4)."""
    return tuple(spec.shape.count(",") + 1 for spec in INPUTS)


def output_rule(ranks: Sequence[int], types: Sequence[str]) -> str:
    """Check input ranks and type tokens (contract order); the output has ``v``'s shape and this type token."""
    expected_ranks = contract_ranks()
    if tuple(ranks) != expected_ranks:
        raise ConfigError(f"{PLUGIN_ID}: got input ranks {dict(zip(OP_INPUT_NAMES, ranks))}; expected "
                          f"{dict(zip(OP_INPUT_NAMES, expected_ranks))} ({', '.join(s.shape for s in INPUTS)})")
    for combination in autotune_type_combinations():
        if tuple(types) == combination[:len(INPUTS)]:
            return combination[len(INPUTS)]
    supported = [dict(zip(OP_INPUT_NAMES, c)) for c in autotune_type_combinations()]
    raise ConfigError(f"{PLUGIN_ID}: got input types {dict(zip(OP_INPUT_NAMES, types))}; expected one of {supported} "
                      "(export with dtype float32 or float16: rotations stay float32 and the mask int32)")


# ------------------------------------------------------------------------------------------------ TensorRT part
# Imported here, below the pure helpers, so that those stay readable on machines without TensorRT.
try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except (ImportError, OSError) as _exc:
    raise ImportError(f"reformer_rt.plugins.tensorrt_plugin needs TensorRT >= "
                      f"{'.'.join(map(str, TENSORRT_MIN_VERSION))} with its Python plugin API (tensorrt.plugin): "
                      f"{TENSORRT_INSTALL_HINT} (import failed: {_exc})") from _exc

import torch  # noqa: E402  (after the TensorRT probe on purpose, see above)

from .lsh_triton import lsh_attention_triton  # noqa: E402

_TRT_TYPE_TOKENS = {trt.DataType.FLOAT: TYPE_TOKENS["float32"], trt.DataType.HALF: TYPE_TOKENS["float16"],
                    trt.DataType.INT32: TYPE_TOKENS["int32"]}


def _type_token(dtype: trt.DataType) -> str:
    return _TRT_TYPE_TOKENS.get(dtype, str(dtype))


def _lsh_attention_desc(qk: trtp.TensorDesc, v: trtp.TensorDesc, rotations: trtp.TensorDesc, mask: trtp.TensorDesc,
                        num_hashes: Int32Array, bucket_factors: Int32Array, chunk_length: Int32Array,
                        chunks_before: Int32Array, chunks_after: Int32Array, causal: Int32Array) -> trtp.TensorDesc:
    """Output descriptor: validates ranks, types and attributes at build time; the output is like ``v``."""
    inputs = (qk, v, rotations, mask)
    output_rule([t.ndim for t in inputs], [_type_token(t.dtype) for t in inputs])
    attributes = (num_hashes, bucket_factors, chunk_length, chunks_before, chunks_after, causal)
    lsh_attrs_from_fields(dict(zip(ATTRIBUTE_NAMES, attributes)))
    return v.like()


def _lsh_attention_autotune(qk: trtp.TensorDesc, v: trtp.TensorDesc, rotations: trtp.TensorDesc,
                            mask: trtp.TensorDesc,
                            outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    """fp32 and fp16 for qk/v/out together; fp32 rotations; int32 mask; LINEAR everywhere."""
    return [trtp.AutoTuneCombination(autotune_io_types(), AUTOTUNE_LAYOUTS)]


def _lsh_attention_enqueue(qk: trtp.Tensor, v: trtp.Tensor, rotations: trtp.Tensor, mask: trtp.Tensor,
                           num_hashes: Int32Array, bucket_factors: Int32Array, chunk_length: Int32Array,
                           chunks_before: Int32Array, chunks_after: Int32Array, causal: Int32Array,
                           outputs: tuple[trtp.Tensor], stream: int) -> None:
    """Run the Triton launchers on TensorRT's stream and write ``outputs[0]``."""
    attributes = (num_hashes, bucket_factors, chunk_length, chunks_before, chunks_after, causal)
    attrs = lsh_attrs_from_fields(dict(zip(ATTRIBUTE_NAMES, attributes)))
    # Triton launches on torch's current stream; make it TensorRT's so the plugin is ordered with the engine.
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        qk_t, v_t, rotations_t, mask_t = (torch.as_tensor(t, device="cuda") for t in (qk, v, rotations, mask))
        out = torch.as_tensor(outputs[0], device="cuda")
        out.copy_(lsh_attention_triton(qk_t, v_t, rotations_t, mask_t, attrs))


def _register() -> None:
    plugin_version()
    check_signature(_lsh_attention_desc, REGISTER_PARAMETERS)
    check_signature(_lsh_attention_autotune, AUTOTUNE_PARAMETERS)
    check_signature(_lsh_attention_enqueue, IMPL_PARAMETERS)
    trtp.register(PLUGIN_ID)(_lsh_attention_desc)
    trtp.autotune(PLUGIN_ID)(_lsh_attention_autotune)
    trtp.impl(PLUGIN_ID)(_lsh_attention_enqueue)


_register()
