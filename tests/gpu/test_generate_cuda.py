"""Cached decoding on a CUDA GPU (marked ``gpu``): the prefill runs the Triton kernels, the steps plain torch.

Against the same model and device with the reference op (so the difference is the op's), against the CPU, and
through ``Session.generate(device="cuda")`` in fp32 and fp16. Run in its own process, without
``TRITON_INTERPRET`` (see ``test_kernels_cuda.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from helpers.lsh_cases import small_lm
from reformer_rt.models import ReformerLM
from reformer_rt.models.decoding import DecodeCache, prefill, step
from reformer_rt.models.lsh_op import forced_kernels
from reformer_rt.plugins.kernels import _lsh_attend_kernel
from reformer_rt.runtime import GenerationOptions, Session

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: these tests decode on CUDA with the "
                       "compiled Triton kernels (make gpu-check OUT=DIR on a GPU machine)"),
]
if torch.cuda.is_available() and isinstance(_lsh_attend_kernel, InterpretedFunction):
    pytest.skip("the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 before triton was imported); "
                "run `pytest tests/gpu` in its own process without it", allow_module_level=True)

#: Longer than a chunk (hashed at the prefill), shorter (hashed when the cache reaches the chunk), padded.
LENGTHS = [100, 9, 16, 57]
NEW_TOKENS = 24


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


@torch.inference_mode()
def _greedy(model: ReformerLM, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    device = model.lm_head.decoder.weight.device
    longest = max(map(len, prompts))
    cache = DecodeCache.empty(model, len(prompts), longest + NEW_TOKENS, longest)
    logits = torch.cat([prefill(model, cache, [row], torch.tensor([p], device=device))
                        for row, p in enumerate(prompts)])
    history = []
    for i in range(NEW_TOKENS):
        history.append(logits.float().cpu())
        if i + 1 < NEW_TOKENS:
            logits = step(model, cache, logits.argmax(-1))
    stacked = torch.stack(history, 1)
    return stacked.argmax(-1).tolist(), stacked


def test_cuda_triton_prefill_equals_reference_op() -> None:
    model = small_lm().cuda()
    prompts = _prompts(model.config.vocab_size)
    results = {}
    for kernels in ("reference", "triton"):
        with forced_kernels(kernels):
            results[kernels] = _greedy(model, prompts)
    assert results["triton"][0] == results["reference"][0]
    assert (results["triton"][1] - results["reference"][1]).abs().max().item() <= 1e-4


def test_cuda_decoding_matches_the_cpu() -> None:
    model = small_lm()
    prompts = _prompts(model.config.vocab_size)
    cpu_tokens, cpu_logits = _greedy(model, prompts)
    cuda_tokens, cuda_logits = _greedy(small_lm().cuda(), prompts)
    assert cuda_tokens == cpu_tokens
    assert (cuda_logits - cpu_logits).abs().max().item() <= 1e-4  # two devices: fp32 noise of both


def test_session_generate_on_cuda(tmp_path: Path) -> None:
    model = small_lm()
    model.save_pretrained(tmp_path / "lm")
    prompts = _prompts(model.config.vocab_size)
    fp32 = Session(tmp_path / "lm", backend="torch", device="cuda")
    result = fp32.generate(prompts, GenerationOptions(NEW_TOKENS))
    for i, prompt in enumerate(prompts):
        assert fp32.generate([prompt], GenerationOptions(NEW_TOKENS)).tokens[0] == result.tokens[i]
    sampling = GenerationOptions(NEW_TOKENS, strategy="sample", top_p=0.9, seed=3)
    sampled = fp32.generate(prompts, sampling)
    assert fp32.generate(prompts, sampling).tokens == sampled.tokens
    fp16 = Session(tmp_path / "lm", backend="torch", device="cuda", dtype="float16").generate(
        prompts, GenerationOptions(NEW_TOKENS))
    assert [len(t) for t in fp16.tokens] == [NEW_TOKENS] * len(prompts)
    agree = np.mean([a == b for x, y in zip(fp16.tokens, result.tokens) for a, b in zip(x[:4], y[:4])])
    assert agree >= 0.75  # fp16 rounding may flip a near tie; most first tokens agree with fp32
