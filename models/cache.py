"""Incremental-decoding caches (HF's ``past_buckets_states``) and the attention of one cached step.

A prompt runs once through the model's own forward (the prefill); then each new token attends to its layer's
cache, as in transformers' ``ReformerModelWithLMHead.generate(use_cache=True)``. Per layer:

* Local attention keeps every past key (divided by sqrt(D)) and value, [B, H, capacity, D]. HF keeps the
  layer-normed hidden states and projects them again each step: the same numbers. A new token at position L
  attends, with no mask, to itself and to the cached positions from ``((L // chunk) - chunks_before) * chunk`` on
  -- a negative start counts from the end, as Python slicing does in HF.
* LSH attention keeps every past shared query/key and value, each past token's bucket per hash round, and in
  place of HF's argsort of all buckets at every step: the tokens hashed together (the prompt) sorted once by
  (bucket, position) with their count per bucket, and the count per bucket of the tokens since. The new token is
  hashed and placed after every cached token whose bucket is not larger (a stable sort puts the latest position
  last); per round it attends to the tokens at sorted ranks ``(rank // chunk - chunks_before) * chunk`` onwards,
  ``(chunks_before + 1 + chunks_after) * chunk`` of them, ranks taken modulo the cached length + 1 (HF's wrap
  when that length is not a chunk multiple; a short cache repeats tokens), with the self mask only; rounds
  combine by their logsumexp weights. A layer whose prompt was not hashed (no longer than the chunk) attends to
  every cached token until the length reaches the chunk, and that step hashes them all.
* Bucket values follow HF's exactly, including its offsets per round: a padded prompt is hashed with an extra
  padding bucket, so its rounds lie ``num_buckets + 1`` apart, and a new token uses that spacing only when the
  largest cached value calls for it (HF's ``increase_num_buckets``). Buckets are stored relative to
  ``round * num_buckets``, which keeps HF's order within each round and bounds them by ``num_buckets + n_hashes``.

Per step, the LSH work is O(window + buckets + generated tokens) and the local work O(window): no term grows with
the prompt. How the cached step differs from recomputing the whole sequence -- HF's approximation, kept as is:
past tokens keep the states they were computed with, while in a recompute a later token entering the sorted
order moves the chunk boundaries (and so the outputs) of earlier tokens in LSH layers; the rounds wrap each on
itself instead of looking back into the previous round; padding to the chunk multiple plays no part. Local-only
models are unaffected. Measured figures: README "Generation".

Limits: every batch row has its own cache and positions (HF's cached LSH step gathers the hidden states of all
rows from row 0: it is right only for batch size 1); inference only; scores in fp32 whatever the cache dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from .lsh import SELF_MASK_VALUE, LSHAttrs, _keys, lsh_hash


def _write_rows(buffer: torch.Tensor, rows: torch.Tensor, length: int, values: torch.Tensor) -> None:
    """buffer[rows, :, :length] = values[:, :, :length] (buffer [B,H,capacity,...])."""
    buffer[rows, :, :length] = values[:, :, :length].to(buffer.dtype)


def _write_new(buffer: torch.Tensor, lengths: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[b, :, lengths[b]] = values[b] for every row (buffer [B,H,capacity,D], values [B,H,D])."""
    rows = torch.arange(buffer.shape[0], device=buffer.device)
    buffer[rows, :, lengths] = values.to(buffer.dtype)


def _gather_rows(buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """buffer [B,H,capacity,D], positions [B,H,M] -> [B,H,M,D] in fp32 (whole rows: index_select, not gather)."""
    batch, heads, capacity, dim = buffer.shape
    offsets = torch.arange(batch * heads, device=buffer.device).view(batch, heads, 1) * capacity
    rows = buffer.view(batch * heads * capacity, dim).index_select(0, (positions + offsets).flatten())
    return rows.view(*positions.shape, dim).float()


@dataclasses.dataclass
class LocalCache:
    """One local-attention layer's past keys (already / sqrt(D)) and values, [B,H,capacity,D]. Written in place."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, head_dim: int, like: torch.Tensor) -> LocalCache:
        shape = (batch, heads, capacity, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape))

    def write_prompt(self, rows: torch.Tensor, length: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prefill's keys/values [b,H,>=length,D] (padding beyond ``length`` is dropped) in ``rows``."""
        _write_rows(self.keys, rows, length, keys)
        _write_rows(self.values, rows, length, values)

    def select(self, rows: torch.Tensor) -> LocalCache:
        return LocalCache(self.keys[rows], self.values[rows])

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor,
               chunk: int, before: int) -> torch.Tensor:
        """The new tokens' attention: query/key/value [B,H,D] at positions ``lengths`` [B] -> [B,H,D] (fp32)."""
        _write_new(self.keys, lengths, key)
        _write_new(self.values, lengths, value)
        start = (torch.div(lengths, chunk, rounding_mode="floor") - before) * chunk
        start = torch.where(start < 0, (lengths + start).clamp(min=0), start)  # HF: past[:, start:] with start < 0
        width = (before + 1) * chunk
        positions = start[:, None] + torch.arange(width, device=lengths.device)  # [B, width]
        valid = positions <= lengths[:, None]
        positions = torch.minimum(positions, lengths[:, None])[:, None].expand(-1, self.keys.shape[1], -1)
        keys, values = _gather_rows(self.keys, positions), _gather_rows(self.values, positions)  # [B,H,width,D]
        scores = torch.matmul(keys, query.float().unsqueeze(-1)).squeeze(-1)  # [B,H,width]
        scores = scores.masked_fill(~valid[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs.unsqueeze(-2), values).squeeze(-2)


@dataclasses.dataclass
class LSHCache:
    """One LSH layer's past: keys (qk normalised as the contract's keys) and values [B,H,capacity,D]; the raw qk of
    the first chunk + 1 positions ``early_qk`` (what the layer hashes if its cache reaches the chunk unhashed);
    buckets (relative to round * num_buckets) of the tokens hashed together in ``base_order`` [B,H,n_hashes,base
    capacity] (positions sorted by bucket) with ``base_counts`` [B,H,n_hashes,K] per bucket and ``base_starts``
    (their exclusive cumulative sum: where each bucket starts in ``base_order``), and of the tokens
    after them in ``tail_buckets`` [B,H,n_hashes,capacity] with ``tail_counts``; ``max_key`` [B] the largest bucket
    value HF would hold; ``base_length`` per row on the host (0: not hashed yet). Written in place."""

    keys: torch.Tensor
    values: torch.Tensor
    early_qk: torch.Tensor
    base_order: torch.Tensor
    base_counts: torch.Tensor
    base_starts: torch.Tensor
    tail_buckets: torch.Tensor
    tail_counts: torch.Tensor
    max_key: torch.Tensor
    base_length: list[int]

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, base_capacity: int, head_dim: int, attrs: LSHAttrs,
              like: torch.Tensor) -> LSHCache:
        shape = (batch, heads, capacity, head_dim)
        ints = dict(dtype=torch.int64, device=like.device)
        rounds = (batch, heads, attrs.num_hashes)
        slots = attrs.num_buckets + attrs.num_hashes  # relative buckets: up to num_buckets - 1 + round
        early = like.new_zeros(batch, heads, attrs.chunk_length + 1, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape), early, torch.zeros(*rounds, base_capacity, **ints),
                   torch.zeros(*rounds, slots, **ints), torch.zeros(*rounds, slots, **ints),
                   torch.zeros(*rounds, capacity, **ints), torch.zeros(*rounds, slots, **ints),
                   torch.zeros(batch, **ints), [0] * batch)

    def select(self, rows: torch.Tensor) -> LSHCache:
        kept = rows.tolist()
        return LSHCache(self.keys[rows], self.values[rows], self.early_qk[rows], self.base_order[rows],
                        self.base_counts[rows], self.base_starts[rows], self.tail_buckets[rows],
                        self.tail_counts[rows], self.max_key[rows], [self.base_length[i] for i in kept])

    def write_prompt(self, rows: torch.Tensor, length: int, qk: torch.Tensor, values: torch.Tensor,
                     buckets: torch.Tensor | None, attrs: LSHAttrs) -> None:
        """Store a prefill's qk/values [b,H,>=length,D] in ``rows``, and its buckets [b,H,n_hashes,>=length]
        when the prefill hashed (``None``: it ran full attention). A padded prefill (longer buckets) hashed with
        the padding bucket, so its rounds lie ``num_buckets + 1`` apart."""
        _write_rows(self.keys, rows, length, _keys(qk.float()))
        _write_rows(self.values, rows, length, values)
        _write_rows(self.early_qk, rows, min(length, self.early_qk.shape[2]), qk)
        if buckets is None:
            for row in rows.tolist():
                self.base_length[row] = 0
            return
        padded = buckets.shape[-1] > length
        self._hash_base(rows, buckets[..., :length], attrs, spacing=attrs.num_buckets + int(padded))

    def _hash_base(self, rows: torch.Tensor, buckets: torch.Tensor, attrs: LSHAttrs, spacing: int) -> None:
        """Make ``buckets`` [b,H,n_hashes,T] (of positions 0..T-1, rounds ``spacing`` apart in HF) the rows' base."""
        length = buckets.shape[-1]
        rounds = torch.arange(attrs.num_hashes, device=buckets.device)[:, None]  # [n_hashes, 1]
        relative = buckets + rounds * (spacing - attrs.num_buckets)  # HF's value - round * num_buckets
        self.base_order[rows, ..., :length] = torch.sort(relative, dim=-1, stable=True).indices
        counts = torch.zeros_like(self.base_counts[rows]).scatter_add_(-1, relative, torch.ones_like(relative))
        self.base_counts[rows] = counts
        self.base_starts[rows] = torch.cumsum(counts, dim=-1) - counts
        self.tail_counts[rows] = 0
        self.max_key[rows] = (relative + rounds * attrs.num_buckets).amax(dim=(1, 2, 3))
        for row in rows.tolist():
            self.base_length[row] = length

    def attend(self, qk: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, host_lengths: list[int],
               rotations: torch.Tensor, attrs: LSHAttrs) -> torch.Tensor:
        """The new tokens' attention: qk/value [B,H,D] at positions ``lengths`` [B] -> [B,H,D] (fp32)."""
        _write_new(self.keys, lengths, _keys(qk.float()))
        _write_new(self.values, lengths, value)
        _write_new(self.early_qk, lengths.clamp(max=self.early_qk.shape[2] - 1), qk)  # only unhashed rows read it
        buckets = self._new_buckets(qk, attrs, rotations)  # [B,H,n_hashes]
        if all(self.base_length):
            positions = self._sorted_window(buckets, lengths, host_lengths, attrs)
            rounds_used = torch.ones(qk.shape[0], attrs.num_hashes, dtype=torch.bool, device=qk.device)
        else:
            positions, rounds_used = self._full_window(lengths, attrs)
        if any(self.base_length) and not all(self.base_length):
            hashed = torch.tensor([n > 0 for n in self.base_length], device=qk.device)  # [B]
            window = self._sorted_window(buckets, lengths, host_lengths, attrs)
            positions = torch.where(hashed[:, None, None, None], window, positions)
            rounds_used = rounds_used | hashed[:, None]
        out = self._attend_window(qk, positions, lengths, rounds_used)
        self._append(buckets, host_lengths, attrs)
        self._start_hashing(host_lengths, rotations, attrs)
        return out

    def _new_buckets(self, qk: torch.Tensor, attrs: LSHAttrs, rotations: torch.Tensor) -> torch.Tensor:
        """Buckets [B,H,n_hashes] of the new tokens, relative to round * num_buckets as HF would offset them."""
        ones = torch.ones(qk.shape[0], 1, dtype=torch.int32, device=qk.device)
        raw = lsh_hash(qk.unsqueeze(2), rotations, ones, attrs)[..., 0]  # [B,H,n_hashes]
        wider = (self.max_key > attrs.num_hashes * attrs.num_buckets - 1).long()  # HF's increase_num_buckets
        rounds = torch.arange(attrs.num_hashes, device=qk.device)
        return raw + rounds * wider[:, None, None]

    def _full_window(self, lengths: torch.Tensor, attrs: LSHAttrs) -> tuple[torch.Tensor, torch.Tensor]:
        """Before hashing: every position 0..L (HF's standard attention), in round 0 only."""
        width = _window_width(attrs)
        batch, heads = self.keys.shape[:2]
        positions = torch.arange(width, device=lengths.device).expand(batch, width)
        positions = torch.where(positions <= lengths[:, None], positions, -1)  # -1: no token (masked)
        positions = positions[:, None, None].expand(batch, heads, attrs.num_hashes, width)
        rounds_used = torch.arange(attrs.num_hashes, device=lengths.device).expand(batch, -1) == 0
        return positions, rounds_used

    def _sorted_window(self, buckets: torch.Tensor, lengths: torch.Tensor, host_lengths: list[int],
                       attrs: LSHAttrs) -> torch.Tensor:
        """Positions [B,H,n_hashes,width] around each new token in its round's (bucket, position) order."""
        total = self.base_counts + self.tail_counts  # [B,H,n_hashes,K]
        ends = torch.cumsum(total, dim=-1)  # sorted rank just past each bucket
        rank = ends.gather(-1, buckets.unsqueeze(-1))  # [B,H,n_hashes,1]: the new token's (stable) rank
        chunk, span = attrs.chunk_length, _sorted_span(attrs)
        start = (torch.div(rank, chunk, rounding_mode="floor") - attrs.chunks_before) * chunk
        ranks = (start + torch.arange(span, device=buckets.device)) % (lengths + 1)[:, None, None, None]
        cached = ranks - (ranks > rank).long()  # rank among the cached tokens
        bucket = torch.searchsorted(ends, cached, right=True).clamp(max=ends.shape[-1] - 1)
        starts = ends.gather(-1, bucket) - total.gather(-1, bucket)  # first rank of each bucket
        offset = cached - starts  # rank within the bucket: its base tokens first, then its tail tokens
        base_start, in_bucket = self.base_starts.gather(-1, bucket), self.base_counts.gather(-1, bucket)
        base_index = base_start + offset
        tail_index = starts - base_start + offset - in_bucket
        tail_order = self._tail_order(host_lengths)
        base_pos = self.base_order.gather(-1, base_index.clamp(0, self.base_order.shape[-1] - 1))
        tail_pos = tail_order.gather(-1, tail_index.clamp(0, tail_order.shape[-1] - 1))
        tail_pos = tail_pos + torch.tensor(self.base_length, device=buckets.device)[:, None, None, None]
        positions = torch.where(offset < in_bucket, base_pos, tail_pos)
        positions = torch.where(ranks == rank, lengths[:, None, None, None], positions)
        return torch.nn.functional.pad(positions, (0, _window_width(attrs) - span), value=-1)

    def _tail_order(self, host_lengths: list[int]) -> torch.Tensor:
        """Per round, the tail tokens' indices in (bucket, position) order [B,H,n_hashes,max tail]."""
        counts = [n - b for n, b in zip(host_lengths, self.base_length)]
        if max(counts) <= 0:
            return self.tail_buckets[..., :1]
        buckets = self.tail_buckets[..., :max(counts)]
        unused = torch.arange(max(counts), device=buckets.device) >= torch.tensor(counts, device=buckets.device)[
            :, None, None, None]
        return torch.sort(buckets.masked_fill(unused, self.base_counts.shape[-1]), dim=-1, stable=True).indices

    def _attend_window(self, qk: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                       rounds_used: torch.Tensor) -> torch.Tensor:
        """Shared-QK attention of qk [B,H,D] over positions [B,H,n_hashes,W] (-1 = none), rounds combined."""
        batch, heads, n_hashes, width = positions.shape
        flat = positions.clamp(min=0).reshape(batch, heads, n_hashes * width)
        keys = _gather_rows(self.keys, flat).view(batch, heads, n_hashes, width, -1)
        values = _gather_rows(self.values, flat).view(batch, heads, n_hashes, width, -1)
        scores = torch.matmul(keys, qk.float()[:, :, None, :, None]).squeeze(-1)  # [B,H,n_hashes,W]
        own = positions == lengths[:, None, None, None]
        scores = torch.where(own, SELF_MASK_VALUE[self.keys.dtype], scores).masked_fill(positions < 0, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B,H,n_hashes,1]
        out = torch.matmul(torch.exp(scores - lse).unsqueeze(-2), values).squeeze(-2)  # [B,H,n_hashes,D]
        if n_hashes == 1:
            return out[:, :, 0]
        lse = lse.masked_fill(~rounds_used[:, None, :, None], float("-inf"))
        weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))
        return torch.sum(out * weights, dim=2)

    def _append(self, buckets: torch.Tensor, host_lengths: list[int], attrs: LSHAttrs) -> None:
        """Record the new tokens' buckets as tail tokens (rows that have not hashed overwrite them later)."""
        tail = torch.tensor([n - b for n, b in zip(host_lengths, self.base_length)], device=buckets.device)
        rows = torch.arange(buckets.shape[0], device=buckets.device)
        self.tail_buckets[rows, :, :, tail] = buckets
        self.tail_counts.scatter_add_(-1, buckets.unsqueeze(-1), torch.ones_like(buckets).unsqueeze(-1))
        rounds = torch.arange(attrs.num_hashes, device=buckets.device)
        self.max_key = torch.maximum(self.max_key, (buckets + rounds * attrs.num_buckets).amax(dim=(1, 2)))

    def _start_hashing(self, host_lengths: list[int], rotations: torch.Tensor, attrs: LSHAttrs) -> None:
        """HF hashes a layer's whole cache at the first step whose length (new token included) reaches the chunk."""
        for row, (length, base) in enumerate(zip(host_lengths, self.base_length)):
            total = length + 1
            if base or total < attrs.chunk_length:
                continue
            qk = self.early_qk[row:row + 1, :, :total]
            ones = torch.ones(1, total, dtype=torch.int32, device=qk.device)
            rows = torch.tensor([row], device=qk.device)
            self._hash_base(rows, lsh_hash(qk, rotations, ones, attrs), attrs, spacing=attrs.num_buckets)


def _sorted_span(attrs: LSHAttrs) -> int:
    """Tokens a new token attends to once its layer has hashed (HF: chunks before + its own + chunks after)."""
    return (attrs.chunks_before + 1 + attrs.chunks_after) * attrs.chunk_length


def _window_width(attrs: LSHAttrs) -> int:
    """Key slots of one step: the sorted span, or a whole unhashed cache (at most chunk + 1 tokens) if wider."""
    return max(_sorted_span(attrs), attrs.chunk_length + 1)
