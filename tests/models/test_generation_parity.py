"""Cached decoding (``models/decoding.py``) against transformers' ``generate(use_cache=True, do_sample=False)``:
the same greedy token ids, per-step logits within 1e-4 (fp32), on random-weight checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers.hf_models import make_hf_model

from reformer_rt.models import ConfigError, InputError, ReformerConfig, ReformerLM
from reformer_rt.models.decoding import DecodeCache, prefill, step
from reformer_rt.models.presets import random_model

TOL = 1e-4
NEW_TOKENS = 64
#: Room for 5,000-token prompts plus the new tokens (the test architectures stop at 512 positions).
LONG = dict(axial_pos_shape=[64, 128], max_position_embeddings=8192)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(arch) -> (hf_model, our_model)``, built once per architecture."""
    built: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in built:
            hf = make_hf_model(arch, **LONG)
            directory = tmp_path_factory.mktemp(arch)
            hf.save_pretrained(directory)
            built[arch] = hf, ReformerLM.from_pretrained(directory)
        return built[arch]

    return get


def _prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def greedy(model: ReformerLM, prompts: list[torch.Tensor], new_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens per prompt (one batch, each row at its own length) and logits [B, new_tokens, vocab]."""
    longest = max(p.shape[1] for p in prompts)
    cache = DecodeCache.empty(model, len(prompts), longest + new_tokens, longest)
    logits = torch.cat([prefill(model, cache, [row], p) for row, p in enumerate(prompts)])
    tokens, history = [], []
    for i in range(new_tokens):
        history.append(logits)
        tokens.append(logits.argmax(-1))
        if i + 1 < new_tokens:
            logits = step(model, cache, tokens[-1])
    return torch.stack(tokens, 1).tolist(), torch.stack(history, 1)


def _transformers_greedy(hf, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return out.sequences[0, prompt.shape[1]:].tolist(), torch.stack(out.logits, 1)[0]


@pytest.mark.parametrize("arch,length", [
    ("crime_shrunk", 100),     # padded prompt (112), local/LSH, factorized buckets
    ("crime_shrunk", 1000),
    ("crime_shrunk", 5000),
    ("crime_shrunk", 12),      # shorter than a chunk: full attention until the cache reaches the chunk, then hashed
    ("enwik8_like", 100),      # 4 hash rounds hashed with the padding bucket (HF's wider round offsets)
    ("enwik8_like", 1000),
    pytest.param("enwik8_like", 5000, marks=pytest.mark.slow),
])
def test_greedy_generation_matches_transformers(checkpoints, arch: str, length: int) -> None:
    hf, ours = checkpoints(arch)
    prompt = _prompt(hf.config.vocab_size, length, seed=length)
    expected_tokens, expected_logits = _transformers_greedy(hf, prompt)
    tokens, logits = greedy(ours, [prompt], NEW_TOKENS)
    assert tokens[0] == expected_tokens
    diff = (logits[0] - expected_logits).abs().max().item()
    assert diff <= TOL, f"{arch} prompt {length}: per-step logits differ by {diff}"


def test_ragged_batch_equals_each_prompt_alone(checkpoints) -> None:
    _, ours = checkpoints("enwik8_like")
    prompts = [_prompt(ours.config.vocab_size, n, seed=n) for n in (300, 7, 64, 33, 300)]
    tokens, logits = greedy(ours, prompts, 40)
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_logits = greedy(ours, [prompt], 40)
        assert tokens[row] == alone_tokens[0]
        assert (logits[row] - alone_logits[0]).abs().max().item() <= 1e-5


def test_finished_rows_leave_the_batch(checkpoints) -> None:
    _, ours = checkpoints("crime_shrunk")
    prompts = [_prompt(ours.config.vocab_size, n, seed=n) for n in (50, 20, 90)]
    _, expected = greedy(ours, prompts, 12)
    with torch.inference_mode():
        cache = DecodeCache.empty(ours, 3, 90 + 12, 90)
        logits = torch.cat([prefill(ours, cache, [row], p) for row, p in enumerate(prompts)])
        for i in range(6):
            logits = step(ours, cache, logits.argmax(-1))
        cache = cache.select([0, 2])  # row 1 finished
        logits = step(ours, cache, logits[[0, 2]].argmax(-1))
    assert (logits - expected[[0, 2], 7]).abs().max().item() <= 1e-5


def test_local_only_model_cached_equals_recompute() -> None:
    """Without LSH layers nothing depends on later tokens: the cached path is exact, not an approximation."""
    config = ReformerConfig(vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                            feed_forward_size=48, attn_layers=("local", "local"), axial_pos_shape=(16, 32),
                            axial_pos_embds_dim=(8, 24), max_position_embeddings=512, local_attn_chunk_length=16,
                            is_decoder=True)
    model = random_model(config, scale=0)
    prompt = _prompt(40, 45, seed=1)
    tokens, logits = greedy(model, [prompt], 30)
    with torch.inference_mode():
        full = model(torch.cat([prompt, torch.tensor(tokens)], dim=1))[0, 44:-1]
    assert (full - logits[0]).abs().max().item() <= 1e-5


def test_decoding_refuses_what_it_cannot_run(checkpoints) -> None:
    encoder = ReformerLM(ReformerConfig(vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                                        axial_pos_shape=(16, 32), axial_pos_embds_dim=(8, 24),
                                        max_position_embeddings=512))
    with pytest.raises(ConfigError, match="is_decoder"):
        DecodeCache.empty(encoder, 1, 20, 10)
    _, ours = checkpoints("crime_shrunk")
    with pytest.raises(InputError, match="max_position_embeddings"):
        DecodeCache.empty(ours, 1, 9000, 100)
    cache = DecodeCache.empty(ours, 1, 12, 10)
    with pytest.raises(InputError, match="prefilled"):
        step(ours, cache, torch.tensor([1]))
    with torch.inference_mode():
        logits = prefill(ours, cache, [0], _prompt(64, 10, seed=0))
        step(ours, cache, logits.argmax(-1))
        logits = step(ours, cache, logits.argmax(-1))
        with pytest.raises(InputError, match="capacity"):
            step(ours, cache, logits.argmax(-1))
