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

Known limits: head dim D <= 128; ``L > chunk_length`` must be a multiple of it (the model pads). Block sizes are
chosen per dtype and head dim (``_attend_config``), not autotuned.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from reformer_rt.models.errors import InputError, InputTypeError
from reformer_rt.models.lsh import LEN_NORM_EPS, MASK_VALUE, SELF_MASK_VALUE, LSHAttrs
from reformer_rt.models.lsh_op import KERNELS_ENV

from .kernels import _lsh_attend_kernel, _lsh_combine_kernel, _lsh_hash_kernel

MAX_HEAD_DIM = 128
INTERPRET_ENV = "TRITON_INTERPRET"


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
    if qk.dtype not in (torch.float32, torch.float16) or v.dtype != qk.dtype:
        raise InputTypeError(f"LSHAttention (triton): got qk {qk.dtype}, v {v.dtype}; expected both float32 or "
                             "both float16")
    if qk.dim() != 4 or v.shape != qk.shape:
        raise InputError(f"LSHAttention (triton): got qk {tuple(qk.shape)}, v {tuple(v.shape)}; expected both "
                         "[B,H,L,D] with the same shape")
    batch, heads, length, dim = qk.shape
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise InputError(f"LSHAttention (triton): got head dim D={dim}; expected 1 <= D <= {MAX_HEAD_DIM} "
                         f"(use {KERNELS_ENV}=reference for wider heads)")
    if mask.dtype != torch.int32 or tuple(mask.shape) != (batch, length):
        raise InputError(f"LSHAttention (triton): got mask {mask.dtype} {tuple(mask.shape)}; expected int32 "
                         f"[{batch}, {length}] (1 = token, 0 = padding)")
    expected = attrs.rotations_shape(heads, dim)
    if rotations.dtype not in (torch.float32, torch.float16) or tuple(rotations.shape) != expected:
        raise InputError(f"LSHAttention (triton): got rotations {rotations.dtype} {tuple(rotations.shape)}; "
                         f"expected float32 {list(expected)} = [H, D, num_hashes, sum(bucket_factors)/2]")
    _check_device(qk, v, rotations, mask)


def _dim_block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


@functools.lru_cache(maxsize=64)
def _factors_tensor(factors: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Bucket factors as an int32 device tensor, made once: a fresh host-to-device copy per call would stall."""
    return torch.tensor(factors, dtype=torch.int32, device=device)


def _attend_config(chunk: int, dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch options of the attend kernel; fp32 tiles are smaller (twice the bytes, no MMA) and
    double- rather than triple-buffered, so shared memory stays under ~75 KB for D = 128."""
    if dtype == torch.float16:
        block_m, block_n, stages = min(128, max(16, triton.next_power_of_2(chunk))), 64, 3
    else:
        block_m, block_n, stages = min(64, max(16, triton.next_power_of_2(chunk))), 64 if dim <= 64 else 32, 2
    warps = 8 if block_m * _dim_block(dim) >= 128 * 64 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def lsh_hash_triton(qk: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor, attrs: LSHAttrs) -> torch.Tensor:
    """Bucket ids [B,H,n_hashes,L] int32 (padded positions: ``attrs.num_buckets``); as ``lsh_hash``."""
    _check_inputs(qk, qk, rotations, mask, attrs)
    batch, heads, length, dim = qk.shape
    rotations = rotations.float()  # a model cast with .half() casts this buffer too; the reference upcasts it
    buckets = torch.empty((batch, heads, attrs.num_hashes, length), dtype=torch.int32, device=qk.device)
    factors = _factors_tensor(attrs.bucket_factors, qk.device)
    block_c = max(16, triton.next_power_of_2(attrs.rotation_size // 2))
    block_l = max(16, min(64, 4096 // block_c))  # the [BLOCK_L, BLOCK_C] fp32 tile of rotated values
    grid = (triton.cdiv(length, block_l), attrs.num_hashes, batch * heads)
    _lsh_hash_kernel[grid](
        qk, rotations, mask, factors, buckets,
        *qk.stride(), *rotations.stride(), *mask.stride(), *buckets.stride(),
        heads, length, dim, attrs.rotation_size // 2, attrs.num_buckets,
        N_FACTORS=len(attrs.bucket_factors), BLOCK_L=block_l, BLOCK_K=min(32, _dim_block(dim)), BLOCK_C=block_c,
    )
    return buckets


def lsh_sort_triton(buckets: torch.Tensor) -> torch.Tensor:
    """Positions [B,H,n_hashes,L] (int64) in each round's (bucket, position) order; as ``lsh_sort``."""
    return torch.sort(buckets, dim=-1, stable=True).indices


def lsh_attend(qk: torch.Tensor, v: torch.Tensor, order: torch.Tensor | None, mask: torch.Tensor,
               attrs: LSHAttrs, out: torch.Tensor, lse: torch.Tensor | None) -> None:
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
    config = _attend_config(chunk, dim, qk.dtype)
    grid = (n_chunks * triton.cdiv(chunk, config["BLOCK_M"]), batch * heads)
    order_arg = order if order is not None else mask  # unread when SORTED=False
    order_strides = order.stride() if order is not None else (0, 0, 0)
    lse_arg = lse if lse is not None else out
    lse_strides = lse.stride() if lse is not None else (0, 0, 0)
    _lsh_attend_kernel[grid](
        qk, v, order_arg, mask, out, lse_arg,
        *qk.stride(), *v.stride(), *order_strides, *mask.stride(), *out.stride(), *lse_strides,
        heads, length, dim, chunk, n_chunks, before, window, 1.0 / math.sqrt(dim), LEN_NORM_EPS,
        MASK_VALUE=MASK_VALUE[qk.dtype], SELF_MASK_VALUE=SELF_MASK_VALUE[qk.dtype],
        CAUSAL=attrs.causal, SORTED=order is not None, WRITE_LSE=lse is not None,
        BLOCK_D=_dim_block(dim), **config,
    )


def lsh_combine(rounds: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """out [B,H,L,D] = rounds [B,H,n_hashes,L,D] weighted by softmax over rounds of lse [B,H,n_hashes,L]."""
    batch, heads, n_hashes, length, dim = rounds.shape
    block_l = 32
    grid = (triton.cdiv(length, block_l), batch * heads)
    _lsh_combine_kernel[grid](
        rounds, lse, out, *rounds.stride(), *lse.stride(), *out.stride(),
        heads, length, dim, n_hashes, BLOCK_L=block_l, BLOCK_D=_dim_block(dim),
    )


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
        lsh_attend(qk, v, None, mask, attrs, out, None)
        return out
    n_hashes = attrs.num_hashes
    order = lsh_sort_triton(lsh_hash_triton(qk, rotations, mask, attrs)).view(batch, heads, n_hashes * length)
    if n_hashes == 1:
        lsh_attend(qk, v, order, mask, attrs, out, None)
        return out
    # Per-round rows are kept in the dtype of v: half the traffic of fp32 in fp16 mode, as HF keeps them.
    rounds = torch.empty((batch, heads, n_hashes, length, dim), dtype=v.dtype, device=v.device)
    lse = torch.empty((batch, heads, n_hashes, length), dtype=torch.float32, device=v.device)
    lsh_attend(qk, v, order, mask, attrs, rounds.view(batch, heads, n_hashes * length, dim),
               lse.view(batch, heads, n_hashes * length))
    lsh_combine(rounds, lse, out)
    return out
