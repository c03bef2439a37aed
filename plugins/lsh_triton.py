"""Launchers of the LSH attention kernels: validate inputs, allocate outputs, choose grids and block sizes.

``lsh_attention_triton(qk, v, rotations, mask, attrs)`` implements the v1 contract of ``reformer_rt.models.lsh``
(the signature of ``lsh_attention_reference``); ``lsh_hash_triton`` and ``lsh_sort_triton`` expose the first two
stages so tests can compare them with ``lsh_hash`` / ``lsh_sort`` element for element.

The sort between hashing and attention is ``torch.sort(buckets, stable=True)``: a stable sort of bucket ids keeps
equal buckets in position order, which is exactly the (bucket, position) order of the contract (the reference
reaches the same order by an argsort of the unique keys ``bucket * L + position``). On CUDA it is CUB's segmented
radix sort; int32 keys need half the passes of those int64 keys.

Runs on CUDA tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
triton was imported (slow; for tests). qk and v may be strided views (the model passes a transposed
[B,L,H,D] -> [B,H,L,D] view): the kernels take every stride, so no copy is made. Rotations may arrive as float16
(``model.half()`` casts buffers too); they are upcast to float32, as the reference does.

Tuning policy sits beside the launchers: ``hash_config``, ``attend_config`` and ``combine_config`` choose every
constexpr and launch option from the dtype, the head-dim tile, the chunk length and the rotation size -- fixed
tables rather than ``@triton.autotune``: a choice that is a pure function of the shapes is the same on every run
and can be enumerated and compiled ahead of time. Each launcher builds a ``KernelLaunch`` and runs it;
``specializations()`` enumerates every distinct launch those functions can choose over all accepted inputs, which
``reformer_rt.plugins.compile_check`` compiles for sm_80 and sm_90 without a GPU.

Known limits: head dim D <= 128; ``sum(bucket_factors) <= 2048`` (HF's own bucket rule stays far below);
``L > chunk_length`` must be a multiple of it (the model pads). Outside these, ``REFORMER_RT_KERNELS=reference``
runs the reference.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from typing import Any, NamedTuple

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from reformer_rt.models.errors import InputError, InputTypeError
from reformer_rt.models.lsh import LEN_NORM_EPS, MASK_VALUE, SELF_MASK_VALUE, LSHAttrs
from reformer_rt.models.lsh_op import KERNELS_ENV

from .kernels import _lsh_attend_kernel, _lsh_combine_kernel, _lsh_hash_kernel

MAX_HEAD_DIM = 128
#: Rotation columns per round and factor group the hash kernel stages in one tile (BLOCK_C <= 1024).
MAX_ROTATION_HALF = 1024
DTYPES = (torch.float32, torch.float16)
INTERPRET_ENV = "TRITON_INTERPRET"


class KernelLaunch(NamedTuple):
    """One fully decided kernel launch: positional arguments (tensors, runtime scalars) and ``meta`` (constexprs
    and launch options). Launchers build and run it; the compile check compiles it for a target instead."""

    kernel: Any  # a triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)

    def key(self) -> tuple:
        """What decides the compiled code besides runtime integers: kernel, tensor dtypes, constexprs, options."""
        dtypes = tuple(str(a.dtype).removeprefix("torch.") for a in self.args if isinstance(a, torch.Tensor))
        return (self.kernel.__name__, dtypes, tuple(sorted(self.meta.items())))


# ------------------------------------------------------------------------------------------- tuning policy
def dim_block(dim: int) -> int:
    """The head-dim tile: the next power of two >= D (>= 16, the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(dim))


def hash_config(block_d: int, rotation_half: int) -> dict[str, int]:
    """Tiles of the hash kernel: the [BLOCK_L, BLOCK_C] fp32 tile of rotated values stays near 4K elements; the
    staged [BLOCK_K, BLOCK_C] rotation slices shrink to K = 16 from 512 columns (at K = 32 and 1024 columns they
    would need 260 KB of shared memory, over any GPU's limit)."""
    block_c = max(16, triton.next_power_of_2(rotation_half))
    return {"BLOCK_L": max(16, min(64, 4096 // block_c)), "BLOCK_K": min(32, block_d, max(16, 8192 // block_c)),
            "BLOCK_C": block_c}


def attend_config(chunk: int, block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch options of the attend kernel; fp32 tiles are smaller (twice the bytes, no MMA) and
    double- rather than triple-buffered, so shared memory stays under ~75 KB for D = 128."""
    if dtype == torch.float16:
        block_m, block_n, stages = min(128, max(16, triton.next_power_of_2(chunk))), 64, 3
    else:
        block_m, block_n, stages = min(64, max(16, triton.next_power_of_2(chunk))), 64 if block_d <= 64 else 32, 2
    warps = 8 if block_m * block_d >= 128 * 64 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": warps,
            "num_stages": stages}


def combine_config(block_d: int) -> dict[str, int]:
    return {"BLOCK_L": 32, "BLOCK_D": block_d}


# ------------------------------------------------------------------------------------------------ checks
def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise InputError(f"LSHAttention (triton): got tensors on {sorted({str(t.device) for t in tensors})}; "
                         "expected all on one device")
    if device.type == "cuda":
        return
    interpreted = isinstance(_lsh_attend_kernel, InterpretedFunction)
    if os.environ.get(INTERPRET_ENV) != "1" or not interpreted:
        state = "set now but triton was imported without it" if os.environ.get(INTERPRET_ENV) == "1" else "unset"
        raise InputError(f"LSHAttention (triton): got {device.type} tensors; the Triton kernels run on CUDA "
                         f"tensors, or on CPU tensors only under Triton's interpreter ({INTERPRET_ENV}=1 set "
                         f"before importing triton; it is {state}). Move the tensors to a GPU, set "
                         f"{INTERPRET_ENV}=1 before the first import, or use {KERNELS_ENV}=reference")


def _check_inputs(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                  attrs: LSHAttrs) -> None:
    if qk.dtype not in DTYPES or v.dtype != qk.dtype:
        raise InputTypeError(f"LSHAttention (triton): got qk {qk.dtype}, v {v.dtype}; expected both float32 or "
                             "both float16")
    if qk.dim() != 4 or v.shape != qk.shape:
        raise InputError(f"LSHAttention (triton): got qk {tuple(qk.shape)}, v {tuple(v.shape)}; expected both "
                         "[B,H,L,D] with the same shape")
    batch, heads, length, dim = qk.shape
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise InputError(f"LSHAttention (triton): got head dim D={dim}; expected 1 <= D <= {MAX_HEAD_DIM} "
                         f"(use {KERNELS_ENV}=reference for wider heads)")
    if attrs.rotation_size // 2 > MAX_ROTATION_HALF:
        raise InputError(f"LSHAttention (triton): got bucket_factors {list(attrs.bucket_factors)}; expected a sum "
                         f"of at most {2 * MAX_ROTATION_HALF} buckets (use {KERNELS_ENV}=reference for more)")
    if mask.dtype != torch.int32 or tuple(mask.shape) != (batch, length):
        raise InputError(f"LSHAttention (triton): got mask {mask.dtype} {tuple(mask.shape)}; expected int32 "
                         f"[{batch}, {length}] (1 = token, 0 = padding)")
    expected = attrs.rotations_shape(heads, dim)
    if rotations.dtype not in DTYPES or tuple(rotations.shape) != expected:
        raise InputError(f"LSHAttention (triton): got rotations {rotations.dtype} {tuple(rotations.shape)}; "
                         f"expected float32 {list(expected)} = [H, D, num_hashes, sum(bucket_factors)/2]")
    _check_device(qk, v, rotations, mask)


@functools.lru_cache(maxsize=64)
def _factors_tensor(factors: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Bucket factors as an int32 device tensor, made once: a fresh host-to-device copy per call would stall."""
    return torch.tensor(factors, dtype=torch.int32, device=device)


# --------------------------------------------------------------------------------------------- launches
def hash_launch(qk: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor, factors: torch.Tensor,
                buckets: torch.Tensor, attrs: LSHAttrs) -> KernelLaunch:
    batch, heads, length, dim = qk.shape
    config = hash_config(dim_block(dim), attrs.rotation_size // 2)
    grid = (triton.cdiv(length, config["BLOCK_L"]), attrs.num_hashes, batch * heads)
    args = (qk, rotations, mask, factors, buckets, *qk.stride(), *rotations.stride(), *mask.stride(),
            *buckets.stride(), heads, length, dim, attrs.rotation_size // 2, attrs.num_buckets,
            len(attrs.bucket_factors))
    return KernelLaunch(_lsh_hash_kernel, grid, args, config)


def attend_launch(qk: torch.Tensor, v: torch.Tensor, order: torch.Tensor | None, mask: torch.Tensor,
                  attrs: LSHAttrs, out: torch.Tensor, lse: torch.Tensor | None) -> KernelLaunch:
    """Chunked attention over the sorted rows ``order`` [B,H,n_hashes*L] (None: one chunk, original order).

    Writes ``out`` [B,H,n_rows,D] (n_rows = n_hashes*L, or L when ``order`` is None) and, when given, ``lse``
    [B,H,n_rows] at row ``round * L + position``.
    """
    batch, heads, length, dim = qk.shape
    if order is None:
        chunk, n_chunks, before, window = length, 1, 0, 1
    else:
        chunk, n_chunks = attrs.chunk_length, order.shape[-1] // attrs.chunk_length
        before, window = attrs.chunks_before, attrs.chunks_before + 1 + attrs.chunks_after
    config = attend_config(chunk, dim_block(dim), qk.dtype)
    grid = (n_chunks * triton.cdiv(chunk, config["BLOCK_M"]), batch * heads)
    order_arg = order if order is not None else mask  # unread when SORTED=False
    order_strides = order.stride() if order is not None else (0, 0, 0)
    lse_arg = lse if lse is not None else out
    lse_strides = lse.stride() if lse is not None else (0, 0, 0)
    args = (qk, v, order_arg, mask, out, lse_arg,
            *qk.stride(), *v.stride(), *order_strides, *mask.stride(), *out.stride(), *lse_strides,
            heads, length, dim, chunk, n_chunks, before, window, 1.0 / math.sqrt(dim), LEN_NORM_EPS,
            int(attrs.causal), int(lse is not None))
    meta = {"MASK_VALUE": MASK_VALUE[qk.dtype], "SELF_MASK_VALUE": SELF_MASK_VALUE[qk.dtype],
            "SORTED": order is not None, **config}
    return KernelLaunch(_lsh_attend_kernel, grid, args, meta)


def combine_launch(rounds: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> KernelLaunch:
    """out [B,H,L,D] = rounds [B,H,n_hashes,L,D] weighted by softmax over rounds of lse [B,H,n_hashes,L]."""
    batch, heads, n_hashes, length, dim = rounds.shape
    config = combine_config(dim_block(dim))
    grid = (triton.cdiv(length, config["BLOCK_L"]), batch * heads)
    args = (rounds, lse, out, *rounds.stride(), *lse.stride(), *out.stride(), heads, length, dim, n_hashes)
    return KernelLaunch(_lsh_combine_kernel, grid, args, config)


# -------------------------------------------------------------------------------------------- launchers
def lsh_hash_triton(qk: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor, attrs: LSHAttrs) -> torch.Tensor:
    """Bucket ids [B,H,n_hashes,L] int32 (padded positions: ``attrs.num_buckets``); as ``lsh_hash``."""
    _check_inputs(qk, qk, rotations, mask, attrs)
    batch, heads, length, _ = qk.shape
    rotations = rotations.float()  # a model cast with .half() casts this buffer too; the reference upcasts it
    buckets = torch.empty((batch, heads, attrs.num_hashes, length), dtype=torch.int32, device=qk.device)
    hash_launch(qk, rotations, mask, _factors_tensor(attrs.bucket_factors, qk.device), buckets, attrs).run()
    return buckets


def lsh_sort_triton(buckets: torch.Tensor) -> torch.Tensor:
    """Positions [B,H,n_hashes,L] (int64) in each round's (bucket, position) order; as ``lsh_sort``."""
    return torch.sort(buckets, dim=-1, stable=True).indices


def lsh_attention_triton(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                         attrs: LSHAttrs) -> torch.Tensor:
    """LSH attention per the v1 contract with the Triton kernels: [B,H,L,D] in, [B,H,L,D] out (dtype of v)."""
    _check_inputs(qk, v, rotations, mask, attrs)
    batch, heads, length, dim = qk.shape
    if length > attrs.chunk_length and length % attrs.chunk_length:
        raise InputError(f"LSHAttention (triton): got L={length}; expected L <= chunk_length or a multiple of "
                         f"chunk_length={attrs.chunk_length} (pad the sequence first)")
    out = torch.empty((batch, heads, length, dim), dtype=v.dtype, device=v.device)
    if length <= attrs.chunk_length:
        attend_launch(qk, v, None, mask, attrs, out, None).run()
        return out
    n_hashes = attrs.num_hashes
    order = lsh_sort_triton(lsh_hash_triton(qk, rotations, mask, attrs)).view(batch, heads, n_hashes * length)
    if n_hashes == 1:
        attend_launch(qk, v, order, mask, attrs, out, None).run()
        return out
    # Per-round rows are kept in the dtype of v: half the traffic of fp32 in fp16 mode, as HF keeps them.
    rounds = torch.empty((batch, heads, n_hashes, length, dim), dtype=v.dtype, device=v.device)
    lse = torch.empty((batch, heads, n_hashes, length), dtype=torch.float32, device=v.device)
    attend_launch(qk, v, order, mask, attrs, rounds.view(batch, heads, n_hashes * length, dim),
                  lse.view(batch, heads, n_hashes * length)).run()
    combine_launch(rounds, lse, out).run()
    return out


# ------------------------------------------------------------------------------------- specializations
#: Chunk lengths scanned for the attend policy; it saturates at its largest BLOCK_M (128), far below this.
_CHUNK_SCAN = 512
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "int32": "i32", "int64": "i64"}


def specializations() -> dict[str, KernelLaunch]:
    """Every distinct launch (``KernelLaunch.key``) the launchers can choose, over every input they accept.

    The policy functions, which see the head dim only as its tile ``dim_block(D)``, are evaluated over the whole
    accepted domain -- dtypes, every head-dim tile of D in 1..MAX_HEAD_DIM, chunk lengths, rotation halves up to
    MAX_ROTATION_HALF, sorted (hashed) or not (L <= chunk) -- and each distinct choice is built once as the
    launcher builds it, on meta tensors (no memory). Causal or not, lse written or not and the number of bucket
    factors are runtime arguments the kernels do not specialize on: one compile serves both. A representative
    input is the largest making its choice (D = its tile, chunk = its BLOCK_M, the full rotation tile), so
    runtime integers take typical values: the JIT also specializes on integers divisible by 16 or equal to 1,
    which changes vectorization, not tiles or shared memory. Names read like ``attend fp16 D128 M128 N64 s3 w8
    sorted``.
    """
    blocks = sorted({dim_block(d) for d in range(1, MAX_HEAD_DIM + 1)})
    launches: dict[str, KernelLaunch] = {}
    for dtype in DTYPES:
        chosen = {}
        for block_d, half in itertools.product(blocks, range(1, MAX_ROTATION_HALF + 1)):
            chosen[tuple(hash_config(block_d, half).values())] = (block_d, half)
        for block_d, half in chosen.values():
            _add(launches, _hash_example(dtype, block_d, LSHAttrs(2, (2 * half,), 64)))
        chosen = {}
        for chunk, block_d in itertools.product(range(1, _CHUNK_SCAN + 1), blocks):
            chosen[tuple(attend_config(chunk, block_d, dtype).values())] = (chunk, block_d)
        for (chunk, block_d), hashed in itertools.product(chosen.values(), (False, True)):
            _add(launches, _attend_example(dtype, block_d, LSHAttrs(2, (4,), chunk, 1, 0, True), hashed))
        for block_d in blocks:
            rounds, lse = _meta((1, 2, 2, 64, block_d), dtype), _meta((1, 2, 2, 64), torch.float32)
            _add(launches, combine_launch(rounds, lse, _meta((1, 2, 64, block_d), dtype)))
    return launches


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _hash_example(dtype: torch.dtype, dim: int, attrs: LSHAttrs) -> KernelLaunch:
    qk, mask = _meta((1, 2, 128, dim), dtype), _meta((1, 128), torch.int32)
    rotations = _meta(attrs.rotations_shape(2, dim), torch.float32)
    factors = _meta((len(attrs.bucket_factors),), torch.int32)
    return hash_launch(qk, rotations, mask, factors, _meta((1, 2, attrs.num_hashes, 128), torch.int32), attrs)


def _attend_example(dtype: torch.dtype, dim: int, attrs: LSHAttrs, hashed: bool) -> KernelLaunch:
    length = 2 * attrs.chunk_length if hashed else attrs.chunk_length
    rows = attrs.num_hashes * length if hashed else length
    qk, mask = _meta((1, 2, length, dim), dtype), _meta((1, length), torch.int32)
    order = _meta((1, 2, rows), torch.int64) if hashed else None
    lse = _meta((1, 2, rows), torch.float32) if hashed else None
    return attend_launch(qk, qk, order, mask, attrs, _meta((1, 2, rows, dim), dtype), lse)


def _add(launches: dict[str, KernelLaunch], launch: KernelLaunch) -> None:
    kernel, dtypes, meta = launch.key()
    words = {"BLOCK_D": "D", "BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_L": "L", "BLOCK_K": "K", "BLOCK_C": "C",
             "num_warps": "w", "num_stages": "s"}
    parts = [kernel.removeprefix("_lsh_").removesuffix("_kernel"), _DTYPE_NAMES[dtypes[0]]]
    parts += [f"{words[k]}{v}" for k, v in meta if k in words]
    parts += [k.lower() for k, v in meta if v is True]
    name = " ".join(parts)
    assert name not in launches or launches[name].key() == launch.key(), name  # a name must tell launches apart
    launches.setdefault(name, launch)
