"""LSH kernel cases shared by the interpreter tests (``tests/plugins``) and the compiled-kernel tests (``tests/gpu``).

``CASES`` are small enough for Triton's CPU interpreter (L <= 256, D <= 32 but one D = 128 case); ``GPU_CASES``
are the shapes only a GPU runs in seconds (head dims 32/48/64/80/128, chunks up to 256, up to 4 rounds, L up to
4096). Inputs and tolerances come from ``reformer_rt.plugins.parity``.

Importing this module imports ``reformer_rt.plugins`` and so triton: whether the kernels are built for the
interpreter is decided by ``TRITON_INTERPRET`` at that moment -- set (or left unset) by the importing test module
and ``tests/conftest.py`` before this import.
"""

from __future__ import annotations

import dataclasses

import torch

from reformer_rt.models import LSHAttrs, ReformerConfig, ReformerLM
from reformer_rt.plugins.parity import random_inputs


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    length: int
    dim: int
    attrs: LSHAttrs
    padded: bool  # ragged mask: the last batch row loses a third of its tokens (or the only row a tail)

    def __str__(self) -> str:
        a = self.attrs
        factors = "x".join(map(str, a.bucket_factors))
        return (f"B{self.batch}H{self.heads}L{self.length}D{self.dim}-h{a.num_hashes}-b{factors}-c{a.chunk_length}"
                f"-{a.chunks_before}{a.chunks_after}{'-causal' if a.causal else ''}{'-pad' if self.padded else ''}")

    @property
    def hashed(self) -> bool:
        return self.length > self.attrs.chunk_length


def make_case(batch: int, heads: int, length: int, dim: int, hashes: int, factors: tuple[int, ...], chunk: int,
         before: int, after: int, causal: bool, padded: bool) -> Case:
    return Case(batch, heads, length, dim, LSHAttrs(hashes, factors, chunk, before, after, causal), padded)


CASES = [
    make_case(1, 1, 64, 16, 1, (4,), 16, 1, 0, True, False),
    make_case(2, 2, 128, 32, 2, (8,), 32, 1, 0, True, True),
    make_case(2, 1, 96, 24, 4, (4, 6), 24, 1, 1, False, True),   # factorized; D and chunk not powers of two
    make_case(1, 2, 128, 32, 4, (2, 4), 32, 0, 1, True, True),
    make_case(2, 2, 64, 16, 2, (4,), 16, 0, 0, False, True),
    make_case(1, 1, 256, 32, 2, (16,), 64, 1, 0, True, True),    # several chunks per round
    make_case(1, 1, 120, 16, 1, (6,), 40, 1, 0, True, True),     # key blocks straddle chunks, query rows masked
    make_case(1, 1, 32, 16, 1, (4,), 16, 1, 1, False, False),    # window wider than the sequence: repeated chunks
    make_case(1, 1, 64, 128, 2, (4,), 32, 1, 0, True, True),     # widest head
    make_case(2, 2, 48, 32, 2, (4,), 64, 1, 0, True, True),      # L < chunk: full attention
    make_case(1, 2, 64, 16, 1, (4,), 64, 0, 1, False, True),     # L == chunk: full attention
]
FP16_CASES = [CASES[1], CASES[2], CASES[5], CASES[9]]
HASHED_CASES = [c for c in CASES if c.hashed]

GPU_CASES = [
    make_case(2, 4, 1024, 64, 4, (16,), 64, 1, 0, True, True),      # 4 rounds, causal, ragged
    make_case(1, 4, 4096, 128, 4, (32,), 256, 1, 0, True, False),   # the enwik8 layer's head, chunk and rounds
    make_case(2, 2, 2048, 128, 1, (8, 16), 128, 1, 0, True, True),  # one round, factorized, widest head
    make_case(2, 3, 512, 32, 4, (4, 8), 64, 1, 1, False, True),     # factorized, not causal, look-ahead
    make_case(1, 2, 768, 48, 2, (6, 10), 96, 1, 0, True, True),     # D, chunk and factors not powers of two
    make_case(3, 2, 100, 80, 2, (8,), 128, 1, 0, True, True),       # L < chunk: full attention, D = 80
    make_case(2, 2, 256, 64, 4, (16,), 256, 1, 0, False, True),     # L == chunk: full attention, not causal
]
GPU_HASHED_CASES = [c for c in GPU_CASES if c.hashed]


def inputs(case: Case, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """qk, v, rotations, mask of ``case`` (the same numbers on every device)."""
    shape = (case.batch, case.heads, case.length, case.dim)
    return random_inputs(shape, case.attrs, dtype, seed=seed, padded=case.padded, device=device)


def small_lm() -> ReformerLM:
    """A random 3-layer LM (LSH, local, LSH; 2 rounds; factorized buckets; chunk 16; max length 128).

    Not ``presets.random_model``, which adds the noise to the initial values (layer norms near 1, not near 0): its
    logits are about five times larger, and the compiled-kernel tests in ``tests/gpu`` hold these logits to
    absolute tolerances (``FP32_TOL``), so new weights need a GPU run of those tests, which CI cannot do."""
    config = ReformerConfig(
        vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
        attn_layers=("lsh", "local", "lsh"), feed_forward_size=64, is_decoder=True,
        axial_pos_shape=(8, 16), axial_pos_embds_dim=(16, 16), max_position_embeddings=128,
        lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=2, num_buckets=(2, 4), hash_seed=7,
    )
    torch.manual_seed(0)
    model = ReformerLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()
