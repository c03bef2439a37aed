"""The model and the Session on a CUDA GPU with the compiled Triton kernels (marked ``gpu``).

``ReformerLM`` on CUDA with the Triton kernels against the same model and device with the reference op (the rest
of the network is the same code on the same device, so the difference is the op's: fp32 <= 1e-5 per op);
``Session(backend="torch", device="cuda")``: each sequence of a ragged batch equals that sequence run alone, and
repeated runs are bitwise identical. Run in its own process, without ``TRITON_INTERPRET`` (see
``test_kernels_cuda.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from helpers.lsh_cases import small_lm
from reformer_rt.models import ReformerLM
from reformer_rt.models.lsh_op import forced_kernels
from reformer_rt.plugins.kernels import _lsh_attend_kernel
from reformer_rt.plugins.parity import FP32_TOL
from reformer_rt.runtime import Session

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: these tests run the model with the "
                       "compiled Triton kernels (make gpu-check OUT=DIR on a GPU machine)"),
]
if torch.cuda.is_available() and isinstance(_lsh_attend_kernel, InterpretedFunction):
    pytest.skip("the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 before triton was imported); "
                "run `pytest tests/gpu` in its own process without it", allow_module_level=True)

#: Chunk multiples and not, shorter than a chunk (full attention), equal padded lengths (shared micro-batches).
LENGTHS = [5, 16, 23, 32, 40, 64, 70, 3, 128, 100]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReformerLM, Path]:
    model = small_lm()
    directory = tmp_path_factory.mktemp("gpu") / "small_lm"
    model.save_pretrained(directory)
    return model, directory


def _sequences(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


def test_model_triton_on_cuda_equals_reference_op() -> None:
    model = small_lm().cuda()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 128), generator=generator).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 70:] = 0
    attention_mask[2, 9:] = 0
    logits = {}
    for kernels in ("reference", "triton"):
        with torch.inference_mode(), forced_kernels(kernels):
            logits[kernels] = model(input_ids, attention_mask)
    valid = attention_mask.bool()
    assert (logits["triton"] - logits["reference"])[valid].abs().max().item() <= FP32_TOL


def test_session_ragged_batch_equals_each_sequence_alone(checkpoint: tuple[ReformerLM, Path]) -> None:
    model, directory = checkpoint
    session = Session(directory, backend="torch", device="cuda")
    sequences = _sequences(model.config.vocab_size)
    logits = session.run(sequences)["logits"]
    assert logits.shape == (len(sequences), max(LENGTHS), model.config.vocab_size)
    for row, sequence in enumerate(sequences):
        alone = session.run([sequence])["logits"][0]
        assert np.abs(logits[row, :len(sequence)] - alone).max() <= FP32_TOL
        assert not logits[row, len(sequence):].any()  # padded with zeros past its length


def test_session_on_cuda_matches_the_model_on_the_cpu(checkpoint: tuple[ReformerLM, Path]) -> None:
    """Triton on the GPU vs the reference op on the CPU, through the Session: the whole CUDA path."""
    model, directory = checkpoint
    sequences = _sequences(model.config.vocab_size, seed=1)
    logits = Session(directory, backend="torch", device="cuda").run(sequences)["logits"]
    for row, sequence in enumerate(sequences):
        with torch.inference_mode():
            expected = model(torch.tensor([sequence]))[0].numpy()
        assert np.abs(logits[row, :len(sequence)] - expected).max() <= 1e-4  # two devices: fp32 noise of both


def test_session_repeated_runs_are_bitwise_identical(checkpoint: tuple[ReformerLM, Path]) -> None:
    model, directory = checkpoint
    session = Session(directory, backend="torch", device="cuda")
    sequences = _sequences(model.config.vocab_size, seed=2)
    first = session.run(sequences)["logits"]
    for _ in range(2):
        assert np.array_equal(session.run(sequences)["logits"], first)
