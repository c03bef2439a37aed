"""Shared fixtures: small random-weight transformers Reformer checkpoints written with ``save_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels can only run under Triton's interpreter, which must be switched on before triton
# is first imported -- by whichever test module gets there first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def make_hf_model(arch: str, lm: bool = True, seed: int = 0, **overrides):
    """A random-weight transformers Reformer (eval mode, no dropout) with every parameter perturbed."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(ARCHITECTURES[arch], hash_seed=7, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
                  lsh_attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    config = transformers.ReformerConfig(**kwargs)
    torch.manual_seed(seed)
    if not lm:
        model = transformers.ReformerModel(config)
    elif config.is_decoder:
        model = transformers.ReformerModelWithLMHead(config)
    else:
        model = transformers.ReformerForMaskedLM(config)
    with torch.no_grad():  # HF inits layer norms to 1/0 and axial tables alike; perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """``hf_checkpoint(arch, lm=True, **config_overrides) -> (hf_model, directory)``."""

    def build(arch: str, lm: bool = True, **overrides):
        model = make_hf_model(arch, lm=lm, **overrides)
        directory = tmp_path / f"{arch}-{'lm' if lm else 'base'}"
        model.save_pretrained(directory)
        return model, directory

    return build


#: ``slow`` tests run everywhere but in CI (``CI=true``), which keeps to its time budget; REFORMER_RT_SLOW=1 runs them
#: there too.
SLOW_ENV = "REFORMER_RT_SLOW"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI") != "true" or os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow: skipped in CI to keep its time budget ({SLOW_ENV}=1 runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
