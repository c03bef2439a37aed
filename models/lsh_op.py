"""``reformer_rt::LSHAttention`` as a torch custom op, and the one function the model calls.

Implementations are chosen per call from a small registry: ``reference`` (the fp32 oracle from ``lsh.py``,
always present), ``fused`` (``fused.py``: the CPU path, chosen for CPU tensors inside ``fused_attention()``) and
``triton``, which ``reformer_rt.plugins`` registers when it is imported. On a CUDA tensor the op imports the
plugins package on first use (a by-name import, so this package does not depend on it) and runs the Triton kernels
if they are available; inside ``forced_kernels("triton" | "reference")`` the op runs that one, and a forced
implementation that cannot run is an error, never a silent fallback. Users force them with
``REFORMER_RT_KERNELS=triton|reference``: the environment is read at the edges -- the CLI, and the torch backend
when it is made (``parse_kernels``) -- never here, per call.

A fake (meta) kernel gives the output shape so the op traces through ``torch.export``. Autograd: the op is
inference-only; when gradients are needed (training the demo model) ``lsh_attention`` calls the differentiable
reference directly.

ONNX export: inside ``onnx_lowering(form)`` and while ``torch.onnx`` traces the model, ``lsh_attention`` emits
either one ``LSHAttention`` node in the contract's domain (``form="plugin"``, through ``torch.onnx.ops.symbolic``)
or the fused formulation, traced to standard ops (``form="portable"``). The exporter (``reformer_rt.export``) sets
the form; this module only knows the torch side and imports no ONNX package.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Callable, Iterator

import torch

from .errors import InputTypeError, ReformerError
from .fused import fused_active, lsh_attention_fused, lsh_hashed_attention_fused
from .lsh import OP_ID, OP_VERSION, PLUGIN_ATTRIBUTES, LSHAttrs, lsh_attention_reference, lsh_full_attention

SUPPORTED_DTYPES = (torch.float32, torch.float16)
#: The implementations a caller can force (``forced_kernels``), and the variable users force them with.
KERNELS = ("triton", "reference")
KERNELS_ENV = "REFORMER_RT_KERNELS"
PLUGINS_PACKAGE = "reformer_rt.plugins"

Implementation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LSHAttrs], torch.Tensor]
_IMPLEMENTATIONS: dict[str, Implementation] = {"reference": lsh_attention_reference, "fused": lsh_attention_fused}
_plugin_import_error: list[str] = []

#: Lowerings ``lsh_attention`` can trace to during ONNX export (see the module docstring).
ONNX_LOWERINGS = ("plugin", "portable")
_onnx_lowering: contextvars.ContextVar[str | None] = contextvars.ContextVar("reformer_rt_onnx_lowering",
                                                                            default=None)
_kernels: contextvars.ContextVar[str | None] = contextvars.ContextVar("reformer_rt_kernels", default=None)


@contextlib.contextmanager
def forced_kernels(name: str | None) -> Iterator[None]:
    """While active, the op runs implementation ``name`` ("triton" or "reference") on every device; None: the
    choice by device (the module docstring)."""
    if name is not None and name not in KERNELS:
        raise ReformerError(f"kernels: got {name!r}; expected one of {KERNELS} or None")
    token = _kernels.set(name)
    try:
        yield
    finally:
        _kernels.reset(token)


def kernels_forced() -> str | None:
    return _kernels.get()


def parse_kernels(value: str | None) -> str | None:
    """The implementation a ``REFORMER_RT_KERNELS`` value forces (None: unset or empty)."""
    forced = (value or "").strip().lower()
    if forced and forced not in KERNELS:
        raise ReformerError(f"{KERNELS_ENV}: got {value!r}; expected 'triton' or 'reference' (or unset)")
    return forced or None


def register_implementation(name: str, fn: Implementation) -> None:
    """Make ``fn`` selectable as ``name`` (called by ``reformer_rt.plugins`` on import)."""
    _IMPLEMENTATIONS[name] = fn


def _load_plugins() -> None:
    if "triton" in _IMPLEMENTATIONS or _plugin_import_error:
        return
    try:
        importlib.import_module(PLUGINS_PACKAGE)
    except ImportError as exc:
        _plugin_import_error.append(str(exc))


def select_implementation(device: torch.device) -> str:
    """Name of the implementation the op runs for tensors on ``device`` (see module docstring)."""
    forced = _kernels.get()
    if forced == "reference":
        return "reference"
    if forced == "triton" or device.type == "cuda":
        _load_plugins()
    if forced == "triton" and "triton" not in _IMPLEMENTATIONS:
        reason = _plugin_import_error[0] if _plugin_import_error else "it registered no 'triton' implementation"
        raise ReformerError(f"kernels forced to 'triton' ({KERNELS_ENV}=triton or forced_kernels): the Triton "
                            f"kernels are unavailable ({reason}); install triton (pip install triton), or stop "
                            "forcing them to use the reference")
    if forced == "triton" or (device.type == "cuda" and "triton" in _IMPLEMENTATIONS):
        return "triton"
    return "fused" if fused_active() and device.type == "cpu" else "reference"


@torch.library.custom_op(OP_ID, mutates_args=())
def lsh_attention_op(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                     num_hashes: int, bucket_factors: list[int], chunk_length: int, chunks_before: int,
                     chunks_after: int, causal: int) -> torch.Tensor:
    attrs = LSHAttrs(num_hashes, tuple(bucket_factors), chunk_length, chunks_before, chunks_after, bool(causal))
    return _IMPLEMENTATIONS[select_implementation(qk.device)](qk, v, rotations, mask, attrs)


@lsh_attention_op.register_fake
def _lsh_attention_fake(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                        num_hashes: int, bucket_factors: list[int], chunk_length: int, chunks_before: int,
                        chunks_after: int, causal: int) -> torch.Tensor:
    return v.new_empty(qk.shape)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                  attrs: LSHAttrs) -> torch.Tensor:
    """LSH attention per the v1 contract: qk, v [B,H,L,D]; rotations [H,D,n_hashes,rot/2]; mask [B,L] int32."""
    if qk.dtype not in SUPPORTED_DTYPES or v.dtype != qk.dtype:
        raise InputTypeError(f"LSHAttention: got qk {qk.dtype}, v {v.dtype}; expected both float32 or both "
                             "float16 (cast the model with .float() or .half())")
    form = _onnx_lowering.get()
    if form is not None and torch.onnx.is_in_onnx_export():
        if form == "plugin":
            return _lsh_plugin_node(qk, v, rotations, mask, attrs)
        return _lsh_portable(qk, v, rotations, mask, attrs)
    if torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad):
        return lsh_attention_reference(qk, v, rotations, mask, attrs)
    return lsh_attention_op(qk, v, rotations, mask, **attrs.as_dict())


@contextlib.contextmanager
def onnx_lowering(form: str) -> Iterator[None]:
    """While active, an ONNX export traces ``lsh_attention`` as ``form``: "plugin" (one node) or "portable"."""
    if form not in ONNX_LOWERINGS:
        raise ValueError(f"onnx_lowering: got {form!r}; expected one of {ONNX_LOWERINGS}")
    token = _onnx_lowering.set(form)
    try:
        yield
    finally:
        _onnx_lowering.reset(token)


def _lsh_plugin_node(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                     attrs: LSHAttrs) -> torch.Tensor:
    """One ONNX node per the contract: inputs (qk, v, rotations, mask), contract attributes + plugin strings."""
    node_attrs: dict[str, int | str | list[int]] = {**attrs.as_dict(), **PLUGIN_ATTRIBUTES}
    return torch.onnx.ops.symbolic(OP_ID, (qk, v, rotations, mask.to(torch.int32)), node_attrs, dtype=v.dtype,
                                   shape=qk.shape, version=OP_VERSION)


def _lsh_portable(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                  attrs: LSHAttrs) -> torch.Tensor:
    """The fused formulation traced to standard ops, the ``L <= chunk_length`` test kept as a graph-level branch.

    The exported length is symbolic, so the reference's Python test on it cannot be traced; the predicate is a
    0-d tensor (an ONNX ``If``), never a Python bool the tracer could resolve from the declared length range.
    """
    short = torch.scalar_tensor(qk.shape[2], dtype=torch.int64) <= attrs.chunk_length

    def full(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lsh_full_attention(qk, v, mask, attrs)

    def hashed(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lsh_hashed_attention_fused(qk, v, rotations, mask, attrs)

    return torch.cond(short, full, hashed, (qk, v, rotations, mask))
