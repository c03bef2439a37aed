"""Config validation, the num_buckets rule, and bad model input: one clear ValueError/TypeError naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reformer_rt.models import (DEFAULT_HASH_SEED, ConfigError, InputError, InputTypeError, ReformerConfig,
                                ReformerLM, resolve_num_buckets)

SMALL = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=24,
             attn_layers=("local", "lsh"), axial_pos_shape=(8, 16), axial_pos_embds_dim=(4, 12),
             max_position_embeddings=128, lsh_attn_chunk_length=16, local_attn_chunk_length=8, num_buckets=4,
             is_decoder=True)


@pytest.fixture(scope="module")
def model() -> ReformerLM:
    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(**SMALL))


@pytest.mark.parametrize("field,value,words", [
    ("num_buckets", 5, "even"),
    ("num_buckets", [4, 3], "even"),
    ("axial_pos_shape", (8, 8), "max_position_embeddings=128"),
    ("axial_pos_embds_dim", (4, 4), "hidden_size=16"),
    ("attn_layers", ("lsh", "global"), "unknown attention type"),
    ("attn_layers", (), "empty"),
    ("hidden_act", "tanh", "hidden_act"),
    ("num_hashes", 0, ">= 1"),
    ("lsh_attn_chunk_length", 0, ">= 1"),
    ("pad_token_id", 40, "[0, 39]"),
    ("hidden_size", "16", "expected an int"),
    ("is_decoder", "false", "true or false"),
    ("axial_pos_embds", 1, "true or false"),
    ("attn_layers", "lsh", "expected a list"),
    ("attn_layers", None, "expected a list"),
    ("axial_pos_shape", "8,16", "expected a list"),
    ("layer_norm_eps", "1e-12", "positive finite"),
    ("layer_norm_eps", float("inf"), "positive finite"),
    ("layer_norm_eps", True, "positive finite"),
])
def test_inconsistent_config_names_the_field(field: str, value, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        ReformerConfig(**{**SMALL, field: value})
    assert field in str(info.value) and words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_config_json_round_trip_is_transformers_compatible(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = ReformerConfig(**SMALL).resolved()
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert ReformerConfig.from_json_file(path) == config
    hf = transformers.ReformerConfig.from_pretrained(tmp_path)
    assert hf.num_buckets == 4 and list(hf.axial_pos_shape) == [8, 16] and hf.hash_seed == DEFAULT_HASH_SEED


def test_from_dict_rejects_other_model_types_and_ignores_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="model_type"):
        ReformerConfig.from_dict({"model_type": "bert"})
    assert ReformerConfig.from_dict({**SMALL, "architectures": ["X"], "hidden_dropout_prob": 0.1}).hidden_size == 16


def test_resolution_decides_seed_and_buckets() -> None:
    config = dataclasses.replace(ReformerConfig(**SMALL), num_buckets=None, hash_seed=None)
    assert not config.is_resolved
    resolved = config.resolved()
    assert resolved.hash_seed == DEFAULT_HASH_SEED and resolved.num_buckets == 16  # 2 * 128 // 16
    assert config.resolved(max_length=64).num_buckets == 8
    with pytest.raises(ConfigError, match="max_length"):
        config.resolved(max_length=129)


@pytest.mark.parametrize("length,chunk,max_pos,expected", [
    (4096, 64, 4096, 128), (65536, 256, 65536, 512), (524288, 64, 524288, (128, 128)), (100, 64, 4096, 2),
    (64, 64, 4096, 2),
])
def test_num_buckets_rule_is_hf_set_num_buckets(length: int, chunk: int, max_pos: int, expected) -> None:
    assert resolve_num_buckets(length, chunk, max_pos) == expected


@pytest.mark.parametrize("ids,mask,error,words", [
    (torch.tensor([[1, 2, 40]]), None, InputError, "[0, 39]"),
    (torch.tensor([[1, -1, 3]]), None, InputError, "token id -1"),
    (torch.tensor([[1.0, 2.0]]), None, InputTypeError, "integer dtype"),
    (torch.zeros(1, 0, dtype=torch.long), None, InputError, "at least one"),
    (torch.zeros(0, 5, dtype=torch.long), None, InputError, "at least one"),
    (torch.zeros(1, 129, dtype=torch.long), None, InputError, "max_position_embeddings=128"),
    (torch.zeros(5, dtype=torch.long), None, InputError, "[batch, length]"),
    ([[1, 2, 3]], None, InputTypeError, "torch.Tensor"),
    (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), InputError, "shape"),
    (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5), InputTypeError, "attention_mask"),
    (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 2, 0]]), InputError, "0 and 1"),
])
def test_bad_input_raises_one_clear_error(model: ReformerLM, ids, mask, error, words: str) -> None:
    with pytest.raises(error) as info:
        model(ids, attention_mask=mask)
    assert words in str(info.value)


def test_length_that_pads_past_max_positions_is_rejected() -> None:
    config = ReformerConfig(**{**SMALL, "axial_pos_embds": False, "max_position_embeddings": 100})
    with pytest.raises(InputError, match="after padding"):
        ReformerLM(config)(torch.zeros(1, 99, dtype=torch.long))


def test_model_stays_usable_after_rejected_input(model: ReformerLM) -> None:
    ids = torch.randint(0, 40, (2, 50))
    before = model(ids)
    with pytest.raises(InputError):
        model(torch.full((2, 50), 99))
    assert torch.equal(model(ids), before)


def test_padding_to_chunk_multiple_keeps_input_length(model: ReformerLM) -> None:
    ids = torch.randint(0, 40, (3, 37))
    assert model(ids).shape == (3, 37, 40)
    assert ReformerConfig(**SMALL).padded_length(37) == 48 and ReformerConfig(**SMALL).padded_length(8) == 8


def test_chunked_feed_forward_and_lm_head_do_not_change_results() -> None:
    torch.manual_seed(0)
    plain = ReformerLM(ReformerConfig(**SMALL))
    chunked = ReformerLM(ReformerConfig(**SMALL, chunk_size_feed_forward=5, chunk_size_lm_head=7))
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 64))
    assert torch.allclose(plain(ids), chunked(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_positions,chunks,expected", [
    (128, (16, 8), 128),  # a chunk multiple: every length up to it runs
    (100, (8, 8), 96),  # 97..100 would pad to 104
    (12, (8, 12), 8),  # lcm 24 > 12: only lengths up to the shortest chunk, which are never padded
])
def test_max_input_length_is_the_longest_length_that_runs(max_positions: int, chunks, expected: int) -> None:
    config = ReformerConfig(**{**SMALL, "axial_pos_embds": False, "max_position_embeddings": max_positions,
                               "lsh_attn_chunk_length": chunks[0], "local_attn_chunk_length": chunks[1]})
    longest = config.max_input_length
    assert longest == expected
    assert config.padded_length(longest) <= max_positions
    assert all(config.padded_length(n) > max_positions for n in range(longest + 1, max_positions + 1))
