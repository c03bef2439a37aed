"""The million-position preset: HF's bucket rule for its length, and a checkpoint of it that transformers loads and
agrees with."""

from __future__ import annotations

import pytest
import torch

from reformer_rt.models import ReformerLM
from reformer_rt.models.config import resolve_num_buckets
from reformer_rt.models.presets import ARCHITECTURES, CRIME_AND_PUNISHMENT, CRIME_AND_PUNISHMENT_1M, random_model


def test_million_preset_has_crime_and_punishment_widths_and_hf_buckets() -> None:
    config = CRIME_AND_PUNISHMENT_1M
    assert ARCHITECTURES["crime-and-punishment-1m"] is config
    assert config.max_position_embeddings == 1_048_576 == config.max_input_length
    assert config.axial_pos_shape == (1024, 1024)
    assert config.num_buckets == (128, 256) == resolve_num_buckets(1 << 20, 64, 1 << 20)
    for field in ("hidden_size", "num_attention_heads", "attention_head_size", "feed_forward_size", "attn_layers",
                  "axial_pos_embds_dim", "lsh_attn_chunk_length", "local_attn_chunk_length", "num_hashes",
                  "vocab_size", "is_decoder"):
        assert getattr(config, field) == getattr(CRIME_AND_PUNISHMENT, field), field


def test_million_preset_loads_in_transformers_and_agrees(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = random_model(CRIME_AND_PUNISHMENT_1M, ReformerLM, seed=3)
    ours.save_pretrained(tmp_path)
    hf = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path).eval()
    assert list(hf.config.num_buckets) == [128, 256] and list(hf.config.axial_pos_shape) == [1024, 1024]
    ids = torch.randint(0, 320, (1, 256), generator=torch.Generator().manual_seed(0))  # 4 LSH chunks: hashed path
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4
