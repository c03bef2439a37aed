"""The fused chunk attention (``models/fused.py``) against the reference formulations it replaces on CPU."""

from __future__ import annotations

import pytest
import torch

from helpers.lsh_cases import CASES, inputs
from reformer_rt.models import LSHAttrs, lsh_attention_reference
from reformer_rt.models import fused
from reformer_rt.models.attention import _merge_heads
from reformer_rt.models.fused import fused_attention, local_attention_fused, lsh_attention_fused
from reformer_rt.models.errors import ReformerError
from reformer_rt.models.lsh_op import KERNELS_ENV, forced_kernels, kernels_forced, parse_kernels, select_implementation

TOL = 1e-5  # float32; both sides compute in float32, so only rounding differs


def _valid_rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (mask != 0)[:, None, :, None].expand_as(like)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lsh_fused_equals_reference_at_every_token(case) -> None:
    qk, v, rotations, mask = inputs(case, torch.float32)
    expected = lsh_attention_reference(qk, v, rotations, mask, case.attrs)
    got = lsh_attention_fused(qk, v, rotations, mask, case.attrs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got).all(), "padding rows must stay finite: their values meet real queries with weight 0"
    diff = (got - expected).abs()[_valid_rows(mask, got)]
    assert diff.max().item() <= TOL


def test_lsh_rows_that_see_only_themselves_keep_the_references_round_weights(monkeypatch) -> None:
    """Causal, 4 rounds, chunks of 4: many rows see only their own key (every other key in the window is in the
    future); where a row's bucket ends one round and starts the next it sees itself twice, its lse is self-mask +
    log 2 rounded at magnitude 1e5, and the reference's two weights sum to 0.998, not 1. The fused path must
    reproduce that, not a clean softmax."""
    attrs = LSHAttrs(4, (4,), 4, 1, 0, True)
    generator = torch.Generator().manual_seed(0)
    qk = torch.randn(1, 8, 16, 16, generator=generator) * 3
    v = torch.randn(1, 8, 16, 16, generator=generator)
    rotations = torch.randn(8, 16, 4, 2, generator=generator)
    mask = torch.ones(1, 16, dtype=torch.int32)
    expected = lsh_attention_reference(qk, v, rotations, mask, attrs)
    got = lsh_attention_fused(qk, v, rotations, mask, attrs)
    assert (got - expected).abs().max().item() <= TOL
    monkeypatch.setattr(fused, "_self_only_rows", lambda out, lse, self_mask: out)
    clean_softmax = lsh_attention_fused(qk, v, rotations, mask, attrs)
    assert (clean_softmax - expected).abs().max().item() > 10 * TOL, "the case no longer has such a row"


@pytest.mark.parametrize("causal,before,after,length,chunk", [
    (True, 1, 0, 96, 16),     # the usual decoder layer
    (True, 1, 0, 12, 16),     # shorter than a chunk: one block, no look-around
    (True, 2, 0, 64, 16),
    (False, 1, 1, 64, 16),    # encoder: look-ahead, wrapped neighbours attended
    (False, 0, 0, 48, 16),
])
@pytest.mark.parametrize("ragged", [False, True])
def test_local_fused_equals_reference(causal: bool, before: int, after: int, length: int, chunk: int,
                                      ragged: bool) -> None:
    from reformer_rt.models import ReformerConfig
    from reformer_rt.models.attention import LocalSelfAttention

    config = ReformerConfig(hidden_size=24, num_attention_heads=3, attention_head_size=8, attn_layers=("local",),
                            local_attn_chunk_length=chunk, local_num_chunks_before=before,
                            local_num_chunks_after=after, is_decoder=causal, axial_pos_embds=False,
                            max_position_embeddings=128, vocab_size=10, feed_forward_size=8)
    torch.manual_seed(0)
    layer = LocalSelfAttention(config).eval()
    x = torch.randn(2, length, 24)
    mask = torch.ones(2, length, dtype=torch.int32)
    if ragged:
        mask[1, length // 3:] = 0
    with torch.no_grad():
        expected = layer(x, mask)
        q, k, v = layer._project(x)
        got = _merge_heads(local_attention_fused(q, k, v, mask, chunk, before, after, causal))
        with fused_attention():
            through_layer = layer(x, mask)
    valid = (mask != 0)[:, :, None].expand_as(got)
    assert torch.isfinite(got).all()
    assert (got - expected).abs()[valid].max().item() <= TOL
    assert torch.equal(through_layer, got)


def test_fused_is_the_cpu_implementation_only_inside_the_context() -> None:
    cpu = torch.device("cpu")
    assert select_implementation(cpu) == "reference"
    with fused_attention():
        assert select_implementation(cpu) == "fused"
        with forced_kernels("reference"):
            assert select_implementation(cpu) == "reference"  # forcing the oracle still works
    assert select_implementation(cpu) == "reference"


def test_forced_kernels_is_a_context_value_not_the_environment(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv(KERNELS_ENV, "reference")  # read at the edges (CLI, torch backend), never per call
    with fused_attention():
        assert kernels_forced() is None and select_implementation(cpu) == "fused"
        with forced_kernels("reference"):
            assert kernels_forced() == "reference" and select_implementation(cpu) == "reference"
            with forced_kernels(None):  # nested: back to the choice by device
                assert select_implementation(cpu) == "fused"
            assert kernels_forced() == "reference"
        assert kernels_forced() is None
    with pytest.raises(ReformerError, match="kernels: got 'cuda'; expected one of"):
        with forced_kernels("cuda"):
            pass


@pytest.mark.parametrize("value,forced", [(None, None), ("", None), (" Triton ", "triton"), ("reference", "reference")])
def test_parse_kernels_reads_the_variable_value(value, forced) -> None:
    assert parse_kernels(value) == forced


def test_parse_kernels_names_the_variable_in_its_error() -> None:
    with pytest.raises(ReformerError, match="REFORMER_RT_KERNELS: got 'fast'; expected 'triton' or 'reference'"):
        parse_kernels("fast")


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (1, 1, 2, 3, 2), (1, 2, 4, 8)])
@pytest.mark.parametrize("before,after", [(1, 0), (0, 1), (1, 1), (2, 0), (3, 2)])
def test_look_around_by_gather_equals_the_references_rolls(shape, before: int, after: int) -> None:
    from reformer_rt.models.lsh import look_around as rolled

    x = torch.randn(shape)
    assert torch.equal(fused.look_around(x, before, after), rolled(x, before, after))
