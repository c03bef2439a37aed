"""The LSH op contract and its reference against transformers' LSHSelfAttention internals."""

from __future__ import annotations

import pytest
import torch

from reformer_rt.models import LSHAttrs, make_rotations
from reformer_rt.models.lsh import (ATTRIBUTE_NAMES, INPUTS, OP_ID, PLUGIN_ATTRIBUTES, lsh_attention_reference,
                                    lsh_hash, lsh_sort)
from reformer_rt.models.lsh_op import lsh_attention

transformers = pytest.importorskip("transformers")
from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSHSelfAttention  # noqa: E402


def _hf_layer(num_buckets, num_hashes: int, heads: int = 2, head_dim: int = 16, chunk: int = 8,
              causal: bool = True, before: int = 1, after: int = 0, seed: int = 5) -> HFLSHSelfAttention:
    config = transformers.ReformerConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, attention_head_size=head_dim,
        num_buckets=num_buckets, num_hashes=num_hashes, lsh_attn_chunk_length=chunk, hash_seed=seed,
        is_decoder=causal, lsh_num_chunks_before=before, lsh_num_chunks_after=after, attn_layers=["lsh"],
        lsh_attention_probs_dropout_prob=0.0, axial_pos_embds=False, max_position_embeddings=1024)
    return HFLSHSelfAttention(config).eval()


def _attrs(num_buckets, num_hashes: int, chunk: int = 8, causal: bool = True, before: int = 1,
           after: int = 0) -> LSHAttrs:
    factors = (num_buckets,) if isinstance(num_buckets, int) else tuple(num_buckets)
    return LSHAttrs(num_hashes, factors, chunk, before, after, causal)


def test_rotations_are_the_ones_a_seeded_hf_model_draws() -> None:
    attrs = _attrs([4, 8], 3)
    torch.manual_seed(11)
    expected = torch.randn(attrs.rotations_shape(2, 16))
    assert torch.equal(make_rotations(11, 2, 16, attrs), expected)


@pytest.mark.parametrize("num_buckets,num_hashes", [(8, 1), (16, 4), ([4, 8], 2), ([2, 4, 2], 3)])
@pytest.mark.parametrize("padded", [False, True])
def test_buckets_equal_transformers_bit_for_bit(num_buckets, num_hashes: int, padded: bool) -> None:
    batch, heads, length, dim = 2, 2, 64, 16
    hf = _hf_layer(num_buckets, num_hashes)
    attrs = _attrs(num_buckets, num_hashes)
    qk = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length, dtype=torch.int32)
    if padded:
        mask[1, 40:] = 0
    with torch.no_grad():
        hf_buckets = hf._hash_vectors(qk, num_hashes, mask if padded else None)
    ours = lsh_hash(qk, make_rotations(5, heads, dim, attrs), mask, attrs)
    per_round = attrs.num_buckets + (1 if padded else 0)  # HF offsets rounds by the bucket count (+ padding)
    offsets = torch.arange(num_hashes).view(1, 1, -1, 1) * per_round
    assert torch.equal((ours + offsets).flatten(2), hf_buckets)
    if padded:
        assert (ours[1, :, :, 40:] == attrs.num_buckets).all()


def test_sort_is_stable_by_bucket_then_position() -> None:
    buckets = torch.randint(0, 4, (2, 3, 2, 50), generator=torch.Generator().manual_seed(2))
    order = lsh_sort(buckets)
    sorted_buckets = torch.gather(buckets, -1, order)
    assert (sorted_buckets[..., 1:] >= sorted_buckets[..., :-1]).all()
    same = sorted_buckets[..., 1:] == sorted_buckets[..., :-1]
    assert (order[..., 1:][same] > order[..., :-1][same]).all()
    assert torch.equal(order.sort(-1).values, torch.arange(50).expand_as(order))


@pytest.mark.parametrize("num_buckets,num_hashes,causal,before,after,length", [
    (8, 1, True, 1, 0, 64), ([4, 4], 4, True, 1, 0, 64), (4, 2, False, 1, 1, 48), (8, 2, False, 0, 0, 32),
    (8, 3, True, 2, 0, 8), (8, 2, False, 1, 1, 5),  # L <= chunk_length: standard full attention
])
def test_reference_equals_transformers_attention(num_buckets, num_hashes, causal, before, after, length) -> None:
    heads, dim = 2, 16
    hf = _hf_layer(num_buckets, num_hashes, causal=causal, before=before, after=after)
    attrs = _attrs(num_buckets, num_hashes, causal=causal, before=before, after=after)
    hidden = torch.randn(2, length, heads * dim, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, length, dtype=torch.int32)
    mask[0, length * 3 // 4:] = 0
    with torch.no_grad():
        expected = hf(hidden, attention_mask=mask).hidden_states
        qk = hf.query_key(hidden).view(2, length, heads, dim).transpose(1, 2)
        v = hf.value(hidden).view(2, length, heads, dim).transpose(1, 2)
        out = lsh_attention_reference(qk, v, make_rotations(5, heads, dim, attrs), mask, attrs)
    out = out.transpose(1, 2).reshape(2, length, heads * dim)
    assert (out - expected).abs().max().item() <= 1e-5


def test_custom_op_runs_the_reference_on_cpu() -> None:
    attrs = _attrs([2, 4], 2)
    qk, v = torch.randn(2, 1, 2, 32, 8).unbind(0)
    rotations = make_rotations(0, 2, 8, attrs)
    mask = torch.ones(1, 32, dtype=torch.int32)
    expected = lsh_attention_reference(qk, v, rotations, mask, attrs)
    assert torch.equal(torch.ops.reformer_rt.LSHAttention(qk, v, rotations, mask, **attrs.as_dict()), expected)
    assert torch.equal(lsh_attention(qk, v, rotations, mask, attrs), expected)


def test_reference_fp16_inputs_follow_fp32_within_fp16_rounding() -> None:
    # Not causal: no row is left with only itself, so the per-dtype mask constants cannot matter (with causal
    # masking, position 0's round weights are exp(lse - logsumexp(lse)) at lse = -1e5 vs -1e3, whose fp32
    # rounding differs -- HF's behaviour, kept on purpose).
    attrs = _attrs(8, 2, causal=False)
    qk, v = torch.randn(2, 2, 2, 64, 16, generator=torch.Generator().manual_seed(4)).unbind(0)
    rotations = make_rotations(0, 2, 16, attrs)
    mask = torch.ones(2, 64, dtype=torch.int32)
    half = lsh_attention_reference(qk.half(), v.half(), rotations, mask, attrs)
    full = lsh_attention_reference(qk.half().float(), v.half().float(), rotations, mask, attrs)
    assert half.dtype == torch.float16
    assert (half.float() - full).abs().max().item() <= 2e-3  # one fp16 rounding of outputs of magnitude < 4


def test_contract_is_self_consistent() -> None:
    assert OP_ID == "reformer_rt::LSHAttention"
    assert [t.name for t in INPUTS] == ["qk", "v", "rotations", "mask"]
    assert tuple(_attrs(8, 1).as_dict()) == ATTRIBUTE_NAMES
    assert PLUGIN_ATTRIBUTES == {"plugin_namespace": "reformer_rt", "plugin_version": "1"}
    with pytest.raises(ValueError, match="bucket_factors"):
        LSHAttrs(1, (3,), 8)
    with pytest.raises(ValueError, match="chunk_length"):
        LSHAttrs(1, (4,), 0)
