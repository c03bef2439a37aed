"""Reformer self-attention modules: LSH (through the op contract) and chunked local attention.

Parameter names match transformers' ``LSHSelfAttention`` / ``LocalSelfAttention`` so checkpoints load as they
are. Inference semantics only (no dropout). Besides ``forward`` (a whole sequence), each module has the two halves
of incremental decoding: ``prefill`` (``forward`` that also fills the layer's cache) and ``step`` (one new token
per row against that cache; HF's cached path, see ``cache.py``). Shapes: x [B, L, hidden], heads [B, H, L, D],
chunked [B, H, n_chunks, chunk, D].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .cache import LocalCache, LSHCache
from .config import ReformerConfig
from .fused import fused_active, local_attention_fused
from .lsh import MASK_VALUE, LSHAttrs, look_around, lsh_hash, make_rotations
from .lsh_op import lsh_attention


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, head_dim).transpose(1, 2)  # [B,L,H*D] -> [B,H,L,D]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.permute(0, 2, 1, 3).reshape(batch, length, heads * head_dim)  # [B,H,L,D] -> [B,L,H*D]


def lsh_attrs(config: ReformerConfig) -> LSHAttrs:
    """The op attributes of an LSH layer of a resolved config."""
    if config.num_buckets is None:
        raise ValueError("num_buckets is unresolved; call config.resolved(max_length) first")
    buckets = config.num_buckets
    return LSHAttrs(
        num_hashes=config.num_hashes,
        bucket_factors=(buckets,) if isinstance(buckets, int) else tuple(buckets),
        chunk_length=config.lsh_attn_chunk_length,
        chunks_before=config.lsh_num_chunks_before,
        chunks_after=config.lsh_num_chunks_after,
        causal=config.is_decoder,
    )


class LSHSelfAttention(nn.Module):
    """Shared-QK attention within LSH buckets; the attention itself is the ``reformer_rt::LSHAttention`` op."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        if not config.is_resolved:
            raise ValueError("LSHSelfAttention needs a resolved config (config.resolved())")
        self.heads, self.head_dim = config.num_attention_heads, config.attention_head_size
        self.attrs = lsh_attrs(config)
        self.query_key = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.value = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        # Rotations are data derived from the config's seed, not weights: not saved, identical in every layer.
        rotations = make_rotations(config.hash_seed, self.heads, self.head_dim, self.attrs)
        self.register_buffer("rotations", rotations, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B,L,hidden], mask [B,L] int32 -> [B,L,H*D]."""
        qk = _split_heads(self.query_key(x), self.heads, self.head_dim)
        v = _split_heads(self.value(x), self.heads, self.head_dim)
        return _merge_heads(lsh_attention(qk, v, self.rotations, mask, self.attrs))

    def empty_cache(self, batch: int, capacity: int, prompt_capacity: int, like: torch.Tensor) -> LSHCache:
        base = max(prompt_capacity, self.attrs.chunk_length + 1)  # a layer may hash chunk + 1 tokens at once
        return LSHCache.empty(batch, self.heads, capacity, base, self.head_dim, self.attrs, like)

    def prefill(self, x: torch.Tensor, mask: torch.Tensor, length: int, cache: LSHCache,
                rows: torch.Tensor) -> torch.Tensor:
        """``forward`` over a padded prompt of ``length`` tokens, storing its qk, values and buckets in ``rows``."""
        qk = _split_heads(self.query_key(x), self.heads, self.head_dim)
        v = _split_heads(self.value(x), self.heads, self.head_dim)
        out = lsh_attention(qk, v, self.rotations, mask, self.attrs)
        hashed = x.shape[1] > self.attrs.chunk_length  # HF's standard (unhashed) path otherwise
        buckets = lsh_hash(qk, self.rotations, mask, self.attrs) if hashed else None
        cache.write_prompt(rows, length, qk, v, buckets, self.attrs)
        return _merge_heads(out)

    def step(self, x: torch.Tensor, cache: LSHCache, lengths: torch.Tensor, host_lengths: list[int]) -> torch.Tensor:
        """x [B,1,hidden] of one new token per row at positions ``lengths`` [B] -> [B,1,H*D]."""
        qk = self.query_key(x).view(x.shape[0], self.heads, self.head_dim)  # [B,1,H*D] -> [B,H,D]
        v = self.value(x).view(x.shape[0], self.heads, self.head_dim)
        out = cache.attend(qk, v, lengths, host_lengths, self.rotations, self.attrs)  # [B,H,D]
        return out.to(x.dtype).reshape(x.shape[0], 1, self.heads * self.head_dim)


class LocalSelfAttention(nn.Module):
    """Attention within fixed chunks of ``local_attn_chunk_length`` plus neighbour chunks (wrapping, as HF)."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.attention_head_size
        self.chunk = config.local_attn_chunk_length
        self.before, self.after = config.local_num_chunks_before, config.local_num_chunks_after
        self.causal = config.is_decoder
        inner = self.heads * self.head_dim
        self.query = nn.Linear(config.hidden_size, inner, bias=False)
        self.key = nn.Linear(config.hidden_size, inner, bias=False)
        self.value = nn.Linear(config.hidden_size, inner, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B,L,hidden], mask [B,L] (nonzero = token) -> [B,L,H*D]."""
        return self._attend(*self._project(x), mask)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,L,hidden] -> q, k / sqrt(D), v, each [B,H,L,D]."""
        q = _split_heads(self.query(x), self.heads, self.head_dim)
        k = _split_heads(self.key(x), self.heads, self.head_dim) / math.sqrt(self.head_dim)
        v = _split_heads(self.value(x), self.heads, self.head_dim)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if fused_active():
            return _merge_heads(local_attention_fused(q, k, v, mask, self.chunk, self.before, self.after, self.causal))
        batch, _, length, _ = q.shape
        positions = torch.arange(length, device=q.device)
        valid = (mask != 0)[:, None, :]  # [B,1,L]
        if length > self.chunk:
            n_chunks = length // self.chunk
            q = q.reshape(batch, self.heads, n_chunks, self.chunk, self.head_dim)
            k = look_around(k.reshape(q.shape), self.before, self.after)
            v = look_around(v.reshape(q.shape), self.before, self.after)
            positions = positions.view(1, 1, n_chunks, self.chunk)
            k_positions = look_around(positions, self.before, self.after)
            valid = look_around(valid.reshape(batch, 1, n_chunks, self.chunk), self.before, self.after)
        else:
            k_positions = positions
        scores = torch.matmul(q, k.transpose(-1, -2))
        allowed = valid.unsqueeze(-2)
        if self.causal:
            allowed = allowed & (positions.unsqueeze(-1) >= k_positions.unsqueeze(-2))
        scores = torch.where(allowed, scores, MASK_VALUE.get(scores.dtype, MASK_VALUE[torch.float32]))
        probs = torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True))
        out = torch.matmul(probs, v)
        return _merge_heads(out.reshape(batch, self.heads, length, self.head_dim))

    def empty_cache(self, batch: int, capacity: int, prompt_capacity: int, like: torch.Tensor) -> LocalCache:
        return LocalCache.empty(batch, self.heads, capacity, self.head_dim, like)

    def prefill(self, x: torch.Tensor, mask: torch.Tensor, length: int, cache: LocalCache,
                rows: torch.Tensor) -> torch.Tensor:
        """``forward`` over a padded prompt of ``length`` tokens, storing its keys and values in ``rows``."""
        q, k, v = self._project(x)
        cache.write_prompt(rows, length, k, v)
        return self._attend(q, k, v, mask)

    def step(self, x: torch.Tensor, cache: LocalCache, lengths: torch.Tensor,
             host_lengths: list[int]) -> torch.Tensor:
        """x [B,1,hidden] of one new token per row at positions ``lengths`` [B] -> [B,1,H*D]."""
        q, k, v = (t[:, :, 0] for t in self._project(x))  # [B,H,D] each
        out = cache.attend(q, k, v, lengths, self.chunk, self.before)
        return out.to(x.dtype).reshape(x.shape[0], 1, self.heads * self.head_dim)
