"""Fused chunk attention: the CPU fast path of both attention layers, and what the portable ONNX form traces.

The reference formulations (``lsh.lsh_hashed_attention``, ``LocalSelfAttention._attend``) follow transformers
step by step: boolean masks built per score (``Where``), ``logsumexp`` of the masked scores, ``exp(scores -
lse)``. Each is a full pass over the [.., chunk, window] score tensor, and in ONNX Runtime the ``Where`` over a
score-sized boolean and ``ReduceLogSumExp`` are the slowest CPU kernels of the graph (each about 10x a ``Min`` or
a ``Softmax`` of the same size). Here the same attention is

    scores = min(q @ k^T, cap);  out = softmax(scores) @ v;  lse = max(scores) - log(max(softmax(scores)))

where ``cap`` is +large where a key is allowed, ``MASK_VALUE`` where it is masked and ``SELF_MASK_VALUE`` at the
query's own position (LSH). ``min`` with a cap REPLACES a masked score exactly as the reference does (every
finite score lies above both mask values), so probabilities, the logsumexp -- including a row that sees only
itself, whose lse is exactly the self-mask value -- and the rounds' weights agree with the reference to float32
rounding. The cap is built from the key and query positions, already scaled (``position * SCALE``): one
subtraction per score gives 0 exactly at the query's own position and at least ~SCALE in magnitude elsewhere,
which a constant shift and a clamp turn into the three cap values. Keys at padding positions are moved
``PADDING_OFFSET`` positions into the future (causal) or capped by their own [.., 1, window] row (not causal).

The attention runs one head at a time (an unrolled loop over the static head count), so at most a head's score
tensors are alive at once: the memory of the attention does not grow with the number of heads.

One deliberate difference, invisible in any real token's output: a padding query never sees its own (padding)
key as "self" (the reference gives it the self-mask value, here it is masked like other padding keys). Padding
rows attend only through masked keys, and nothing reads a padding row: keys at padding positions are masked for
every real query.

``fused_attention()`` switches a model's eager forward to this path (``Session``'s torch backend on CPU, the ONNX
trace); without it the model runs the reference formulations, bit-identical to transformers.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from .lsh import (MASK_VALUE, SELF_MASK_VALUE, LSHAttrs, _keys, _take_rows, combine_rounds, lsh_attention_by_length,
                  lsh_hash, lsh_sort, unsort_index)

#: Positions are scaled by this before subtracting: distinct positions differ by >= ~SCALE after float32
#: rounding (positions < 2**24), far above any attention score; equal positions give exactly 0.
SCALE = 1e10
#: Causal: a padding key is placed this many positions later, so every query masks it (exact in float32).
PADDING_OFFSET = float(2**23)
#: Local attention (no self mask): a score at distance 0 is allowed; half a step keeps it clear of the clamp.
HALF_STEP = SCALE / 2

_fused: contextvars.ContextVar[bool] = contextvars.ContextVar("reformer_rt_fused_attention", default=False)


@contextlib.contextmanager
def fused_attention(enabled: bool = True) -> Iterator[None]:
    """While active, the attention layers' eager forward runs the fused formulation (module docstring)."""
    token = _fused.set(enabled)
    try:
        yield
    finally:
        _fused.reset(token)


def fused_active() -> bool:
    return _fused.get()


def look_around(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """``lsh.look_around`` as one gather of whole chunks: [B,H,n,chunk,...] -> [B,H,n,(before+1+after)*chunk,...].

    The reference rolls and concatenates (two copies per neighbour); indexing the chunk axis with (j + offset) mod n
    writes each window once (one ONNX ``Gather`` of contiguous blocks)."""
    if before == 0 and after == 0:
        return x
    n_chunks = x.shape[2]
    offsets = torch.arange(-before, after + 1, device=x.device)
    # (a 0-d tensor modulus: ONNX export cannot take a symbolic Python int there)
    modulus = torch.scalar_tensor(n_chunks, dtype=torch.int64, device=x.device)
    chunks = torch.remainder(torch.arange(n_chunks, device=x.device)[:, None] + offsets, modulus)  # [n, window]
    windows = x.index_select(2, chunks.flatten())  # [B,H,n*window,chunk,...]
    return windows.view(*x.shape[:2], n_chunks, (before + 1 + after) * x.shape[3], *x.shape[4:])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: torch.Tensor,
            with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(min(q k^T, cap)) v, and the rows' logsumexp when asked: q [.., n, D], k, v [.., w, D]."""
    scores = torch.minimum(torch.matmul(q, k.transpose(-1, -2)), cap)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)
    if not with_lse:
        return out, None
    # softmax's largest entry is exp(max - lse): lse without a second exp-and-sum pass over the scores
    lse = scores.amax(dim=-1, keepdim=True) - torch.log(probs.amax(dim=-1, keepdim=True))
    return out, lse


def _cap(q_scaled: torch.Tensor, k_scaled: torch.Tensor, shift: float, mask_value: float,
         magnitude: bool = False) -> torch.Tensor:
    """max(q - k + shift, mask_value) (or with |q - k| when ``magnitude``): q [.., n, 1], k [.., 1, w]."""
    diff = q_scaled - k_scaled
    if magnitude:
        diff = diff.abs()
    return torch.clamp(diff + shift, min=mask_value)


# ------------------------------------------------------------------------------------------------------- LSH
def lsh_attention_fused(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                        attrs: LSHAttrs) -> torch.Tensor:
    """The op contract (``lsh.py``) in the fused formulation; the ``L <= chunk_length`` path is the reference's."""
    return lsh_attention_by_length(lsh_hashed_attention_fused, qk, v, rotations, mask, attrs)


def lsh_hashed_attention_fused(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor,
                               attrs: LSHAttrs) -> torch.Tensor:
    """Semantics steps 1-6 of ``lsh.py``; L a multiple of ``chunk_length``. Hashing covers every head at once; from
    the sort on, one head at a time (module docstring)."""
    batch, heads, length, _ = qk.shape
    order = lsh_sort(lsh_hash(qk.float(), rotations, mask, attrs)).reshape(batch, heads, attrs.num_hashes * length)
    invalid = mask == 0
    key_positions = torch.arange(length, device=qk.device, dtype=torch.float32).expand(batch, length)
    if attrs.causal:  # padding keys move into every query's future
        key_positions = key_positions + invalid.to(torch.float32) * PADDING_OFFSET
    valid_cap = None if attrs.causal else torch.where(invalid, MASK_VALUE[qk.dtype], torch.inf)
    outs = [_lsh_head(qk[:, h:h + 1], v[:, h:h + 1], order[:, h:h + 1], key_positions, valid_cap, attrs)
            for h in range(heads)]
    return torch.cat(outs, dim=1).to(v.dtype)


def _lsh_head(qk: torch.Tensor, v: torch.Tensor, order: torch.Tensor, key_positions: torch.Tensor,
              valid_cap: torch.Tensor | None, attrs: LSHAttrs) -> torch.Tensor:
    """One head: qk, v [B,1,L,D], order [B,1,n_hashes*L], key_positions / valid_cap [B,L] -> [B,1,L,D] float32."""
    batch, _, length, dim = qk.shape
    q, val = qk.float(), v.float()
    n_hashes, chunk, before, after = attrs.num_hashes, attrs.chunk_length, attrs.chunks_before, attrs.chunks_after
    n_chunks = n_hashes * length // chunk
    shape = (batch, 1, n_chunks, chunk, dim)
    q_sorted = _take_rows(q, order).view(shape)
    k_sorted = look_around(_take_rows(_keys(q), order).view(shape), before, after)
    v_sorted = look_around(_take_rows(val, order).view(shape), before, after)

    def by_key(row: torch.Tensor) -> torch.Tensor:  # [B,L] -> [B,1,n_chunks,1,window] in sorted key order
        sorted_row = torch.gather(row[:, None, :], 2, order).view(batch, 1, n_chunks, chunk)
        return look_around(sorted_row, before, after).unsqueeze(-2)

    q_scaled = (order.to(torch.float32) * SCALE).view(batch, 1, n_chunks, chunk, 1)
    self_mask, mask_value = SELF_MASK_VALUE[qk.dtype], MASK_VALUE[qk.dtype]
    cap = _cap(q_scaled, by_key(key_positions * SCALE), self_mask, mask_value, magnitude=not attrs.causal)
    if valid_cap is not None:
        cap = torch.minimum(cap, by_key(valid_cap))
    out, lse = _attend(q_sorted, k_sorted, v_sorted, cap, True)
    out = _self_only_rows(out, lse, self_mask)

    undo = unsort_index(order, n_hashes, length)
    return combine_rounds(_take_rows(out.view(batch, 1, -1, dim), undo), lse, undo, n_hashes)


def _self_only_rows(out: torch.Tensor, lse: torch.Tensor, self_mask: float) -> torch.Tensor:
    """The reference's output for a row that sees only itself (its own key, ``copies`` times: once, or again in
    the neighbouring round's chunk): ``copies * exp(self_mask - lse) * v``, where ``lse`` -- self_mask + log(copies)
    rounded at magnitude 1e5 -- makes the weights sum to slightly off 1. A softmax sums to 1 exactly; this puts
    the reference's factor back on those rows (every other row: 1)."""
    alone = (lse - self_mask).abs() < 16  # lse = self_mask + log(copies); rows of only masked keys lie far below
    copies = torch.round(torch.exp(lse - self_mask))
    return out * torch.where(alone, copies * torch.exp(self_mask - lse), 1.0)


# ----------------------------------------------------------------------------------------------------- local
def local_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, chunk: int,
                          before: int, after: int, causal: bool) -> torch.Tensor:
    """``LocalSelfAttention._attend`` fused: q, k (already / sqrt(D)), v [B,H,L,D], mask [B,L] -> [B,H,L,D].

    Computes in float32 whatever the input precision (as the LSH op does): a float16 softmax that differs from the
    reference's float16 logsumexp by a rounding is enough to move a later layer's LSH bucket."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    batch, heads, length, dim = q.shape
    if length <= chunk:  # one chunk, no look-around (the reference's short path)
        chunk, before, after = length, 0, 0
    n_chunks = length // chunk
    mask_value = MASK_VALUE.get(dtype, MASK_VALUE[torch.float32])
    invalid = (mask == 0).view(batch, 1, n_chunks, chunk)
    if causal:
        positions = torch.arange(length, device=q.device, dtype=torch.float32)
        q_scaled = (positions * SCALE + HALF_STEP).view(1, 1, n_chunks, chunk, 1)
        key_positions = positions.view(1, 1, n_chunks, chunk) + invalid.to(torch.float32) * PADDING_OFFSET
        k_scaled = look_around(key_positions * SCALE, before, after).unsqueeze(-2)
        cap = _cap(q_scaled, k_scaled, 0.0, mask_value)  # [B,1,n,chunk,window], shared by heads
    else:
        cap = look_around(torch.where(invalid, mask_value, torch.inf), before, after).unsqueeze(-2)
    shape = (batch, 1, n_chunks, chunk, dim)
    outs = []
    for h in range(heads):
        head = slice(h, h + 1)
        out, _ = _attend(q[:, head].reshape(shape), look_around(k[:, head].reshape(shape), before, after),
                         look_around(v[:, head].reshape(shape), before, after), cap, False)
        outs.append(out.view(batch, 1, length, dim))
    return torch.cat(outs, dim=1).to(dtype)


# ---------------------------------------------------------------------------------- windows (streamed pieces)
def look_around_extended(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """``look_around`` without wrapping, for a caller that laid the neighbours out itself: x [n + before + after,
    chunk, ...] -> [n, (before+1+after)*chunk, ...], chunk j seeing the extended chunks j .. j+before+after."""
    width = before + 1 + after
    if width == 1:
        return x
    n_chunks = x.shape[0] - width + 1
    chunks = (torch.arange(n_chunks, device=x.device)[:, None] + torch.arange(width, device=x.device)).flatten()
    windows = x.index_select(0, chunks)  # [n*width, chunk, ...]
    return windows.view(n_chunks, width * x.shape[1], *x.shape[2:])


def local_attention_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           positions: torch.Tensor, before: int, after: int, causal: bool) -> torch.Tensor:
    """``local_attention_fused`` for one head over a stretch of whole chunks whose neighbours the caller laid out
    (wrapped as the whole sequence would wrap them): q [n, chunk, D]; k (already / sqrt(D)), v [n_ext, chunk, D],
    mask (nonzero = token) and ``positions`` (original, int64) [n_ext, chunk] with n_ext = n + before + after and q
    the extended chunks before .. before+n. Returns [n, chunk, D] float32, the same scores, caps and softmax as the
    whole-sequence form."""
    n_chunks, chunk = q.shape[0], q.shape[1]
    mask_value = MASK_VALUE.get(q.dtype, MASK_VALUE[torch.float32])
    invalid = mask == 0
    if causal:
        key_positions = positions.to(torch.float32) + invalid.to(torch.float32) * PADDING_OFFSET
        q_scaled = (positions[before:before + n_chunks].to(torch.float32) * SCALE + HALF_STEP).unsqueeze(-1)
        k_scaled = look_around_extended(key_positions * SCALE, before, after).unsqueeze(-2)
        cap = _cap(q_scaled, k_scaled, 0.0, mask_value)  # [n, chunk, window]
    else:
        cap = look_around_extended(torch.where(invalid, mask_value, torch.inf), before, after).unsqueeze(-2)
    out, _ = _attend(q.float(), look_around_extended(k.float(), before, after),
                     look_around_extended(v.float(), before, after), cap, False)
    return out


def lsh_attention_window(qk: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                         attrs: LSHAttrs) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's chunk attention over a stretch of SORTED chunks (semantics steps 3-5 of ``lsh.py``) whose
    neighbours in the sorted concatenation of rounds the caller laid out: qk, v [n_ext, chunk, D] rows in sorted
    order, ``mask`` (nonzero = token) and ``positions`` (original, int64) [n_ext, chunk] of those rows, n_ext = n +
    chunks_before + chunks_after. Returns (out [n, chunk, D], lse [n, chunk, 1]) float32 for the inner chunks, as
    ``_lsh_head`` computes them before undoing the sort."""
    before, after = attrs.chunks_before, attrs.chunks_after
    n_chunks = qk.shape[0] - before - after
    self_mask, mask_value = SELF_MASK_VALUE[qk.dtype], MASK_VALUE[qk.dtype]
    q = qk.float()
    invalid = mask == 0
    key_positions = positions.to(torch.float32)
    if attrs.causal:  # padding keys move into every query's future
        key_positions = key_positions + invalid.to(torch.float32) * PADDING_OFFSET
    q_scaled = (positions[before:before + n_chunks].to(torch.float32) * SCALE).unsqueeze(-1)  # [n, chunk, 1]
    cap = _cap(q_scaled, look_around_extended(key_positions * SCALE, before, after).unsqueeze(-2), self_mask,
               mask_value, magnitude=not attrs.causal)
    if not attrs.causal:
        valid_cap = torch.where(invalid, mask_value, torch.inf)
        cap = torch.minimum(cap, look_around_extended(valid_cap, before, after).unsqueeze(-2))
    out, lse = _attend(q[before:before + n_chunks], look_around_extended(_keys(q), before, after),
                       look_around_extended(v.float(), before, after), cap, True)
    return _self_only_rows(out, lse, self_mask), lse
