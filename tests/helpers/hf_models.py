"""Small transformers Reformer models of the architecture families the project must match, every parameter
perturbed (transformers initialises layer norms to 1/0 and axial tables alike, which would hide wrong wiring).
They are built by the project's one factory, ``reformer_rt.models.presets.random_model``, which takes any model
class constructed from its config."""

from __future__ import annotations

import pytest
from torch import nn

from reformer_rt.models.presets import random_model

#: Keyword sets for transformers.ReformerConfig, one per architecture family the project must match.
ARCHITECTURES = {
    # crime-and-punishment layout shrunk: local/LSH alternating, axial positions, factorized buckets, causal.
    "crime_shrunk": dict(
        attn_layers=["local", "lsh", "local", "lsh"], hidden_size=32, num_attention_heads=2, attention_head_size=16,
        feed_forward_size=48, axial_pos_embds=True, axial_pos_shape=[16, 32], axial_pos_embds_dim=[8, 24],
        max_position_embeddings=512, lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=1,
        num_buckets=[4, 8], is_decoder=True, hidden_act="relu", vocab_size=64),
    # enwik8-like: every layer LSH, 4 hash rounds, byte vocabulary, causal.
    "enwik8_like": dict(
        attn_layers=["lsh", "lsh", "lsh"], hidden_size=32, num_attention_heads=2, attention_head_size=16,
        feed_forward_size=64, axial_pos_embds=True, axial_pos_shape=[8, 64], axial_pos_embds_dim=[16, 16],
        max_position_embeddings=512, lsh_attn_chunk_length=32, num_hashes=4, num_buckets=8, is_decoder=True,
        hidden_act="relu", vocab_size=258),
    # encoder: not causal, look-ahead chunks, plain position embeddings, gelu, chunked feed-forward.
    "encoder": dict(
        attn_layers=["lsh", "local", "lsh"], hidden_size=24, num_attention_heads=3, attention_head_size=8,
        feed_forward_size=40, axial_pos_embds=False, max_position_embeddings=256, lsh_attn_chunk_length=8,
        local_attn_chunk_length=16, lsh_num_chunks_before=1, lsh_num_chunks_after=1, local_num_chunks_before=1,
        local_num_chunks_after=1, num_hashes=2, num_buckets=[2, 4], is_decoder=False, hidden_act="gelu",
        chunk_size_feed_forward=8, vocab_size=50),
}


def make_hf_model(arch: str, model_class: type[nn.Module] | None = None, seed: int = 0, **overrides) -> nn.Module:
    """A transformers ``model_class`` of ``ARCHITECTURES[arch]`` (hash seed 7, no dropout) with ``overrides``, in
    eval mode, every parameter perturbed by 0.2; without a class, the architecture's LM (causal or masked)."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(ARCHITECTURES[arch], hash_seed=7, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
                  lsh_attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    config = transformers.ReformerConfig(**kwargs)
    if model_class is None:
        model_class = transformers.ReformerModelWithLMHead if config.is_decoder else transformers.ReformerForMaskedLM
    return random_model(config, model_class, seed=seed, scale=0.2)
