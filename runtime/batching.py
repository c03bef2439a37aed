"""Batching contract: which sequences may share a forward pass, and in which micro-batches.

HF's LSH attention is not padding-invariant: padding a sequence beyond its own chunk multiple moves where each
hash round starts in the sorted order and changes its outputs. So a sequence only ever shares a batch with
sequences that the model runs at the SAME padded length (``ReformerConfig.padded_length``), where masking makes
batch-mates invisible to each other. Sequences no longer than the shortest chunk length are not padded by the
model at all (every layer attends fully); they are batched together at the longest of them, which full attention
with a key mask also leaves unchanged.

Within a length bucket, sequences are cut into micro-batches of at most ``max_tokens_per_batch`` padded tokens
(at least one sequence each; ``DEFAULT_MAX_TOKENS`` unless the caller says otherwise), in input order. The plan is
pure data; the Session executes it and returns exactly one result per input sequence, in input order. The server's
scheduler forms its micro-batches across requests by the same rules (``bucket_length``, ``run_length``,
``sequences_per_batch``, the same default budget). An int8 session runs each sequence of a micro-batch in a pass of
its own, at its ``run_length`` alone: dynamic quantization scales activations per tensor, batch-mates included
(``session.py``).
"""

from __future__ import annotations

import dataclasses

from reformer_rt.models import ReformerConfig

#: Padded tokens per micro-batch unless the caller says otherwise: 131,072 tokens of the crime-and-punishment
#: architecture peak at about 2 GB on ONNX Runtime's CPU provider, and fill a GPU well without crowding it.
DEFAULT_MAX_TOKENS = 1 << 17


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    indices: tuple[int, ...]  # positions in the caller's list
    length: int  # padded length every sequence of this batch runs at

    @property
    def tokens(self) -> int:
        return len(self.indices) * self.length


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    batches: tuple[MicroBatch, ...]
    real_tokens: int

    @property
    def padded_tokens(self) -> int:
        return sum(b.tokens for b in self.batches)

    @property
    def padding_waste(self) -> float:
        """Fraction of computed positions that are padding."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def bucket_length(config: ReformerConfig, length: int) -> int:
    """The length bucket of a ``length``-token sequence: its own padded length (see module docstring)."""
    if length <= config.min_chunk_length:
        return config.min_chunk_length  # bucket id only: such batches run at their longest member
    return config.padded_length(length)


def run_length(config: ReformerConfig, lengths: list[int]) -> int:
    """The padded length a micro-batch of sequences with these ``lengths`` (one bucket) runs at."""
    buckets = {bucket_length(config, n) for n in lengths}
    assert len(buckets) == 1, f"a micro-batch spans length buckets {sorted(buckets)}"
    bucket = buckets.pop()
    return max(lengths) if bucket == config.min_chunk_length else bucket


def sequences_per_batch(bucket: int, max_tokens_per_batch: int) -> int:
    """How many sequences of a bucket fit the token budget (at least one)."""
    return max(1, max_tokens_per_batch // bucket)


def plan_batches(config: ReformerConfig, lengths: list[int], max_tokens_per_batch: int) -> BatchPlan:
    """Group ``lengths`` by bucket, then split each bucket into micro-batches under the token budget."""
    buckets: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        buckets.setdefault(bucket_length(config, length), []).append(index)
    batches: list[MicroBatch] = []
    for bucket in sorted(buckets):
        members = buckets[bucket]
        per_batch = sequences_per_batch(bucket if bucket != config.min_chunk_length
                                        else max(lengths[i] for i in members), max_tokens_per_batch)
        for start in range(0, len(members), per_batch):
            part = tuple(members[start:start + per_batch])
            batches.append(MicroBatch(part, run_length(config, [lengths[i] for i in part])))
    return BatchPlan(tuple(batches), real_tokens=sum(lengths))
