"""The compiled Triton LSH kernels on a CUDA GPU against the fp32 reference on the CPU (marked ``gpu``).

The same criteria as the interpreter tests (``reformer_rt.plugins.parity``): fp32 max abs error <= 1e-5, bucket
ids and sort order equal element for element, fp16 within ``4 * 2^-11 * max|v|``; the shapes add what only a
GPU runs quickly (``GPU_CASES``: head dims 32/48/64/80/128, chunks up to 256, 1 and 4 rounds, L up to 4096).
Inputs are drawn on the CPU, so both sides see the same numbers.

Run in its own process, without ``TRITON_INTERPRET`` (``make gpu-check`` does): ``tests/plugins`` switches
Triton's interpreter on at import, after which no compiled kernel can be built in that process.
"""

from __future__ import annotations

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from helpers.lsh_cases import CASES, GPU_CASES, GPU_HASHED_CASES, Case, inputs, make_case
from reformer_rt.models import LSHAttrs
from reformer_rt.models.lsh import lsh_attention_reference, lsh_hash, lsh_sort
from reformer_rt.plugins.kernels import _lsh_attend_kernel
from reformer_rt.plugins.lsh_triton import lsh_attention_triton, lsh_hash_triton, lsh_sort_triton
from reformer_rt.plugins.parity import FP32_TOL, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: these tests run the compiled Triton "
                       "kernels (make gpu-check OUT=DIR on a GPU machine)"),
]
if torch.cuda.is_available() and isinstance(_lsh_attend_kernel, InterpretedFunction):
    pytest.skip("the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 before triton was imported); "
                "run `pytest tests/gpu` in its own process without it", allow_module_level=True)

DTYPES = (torch.float32, torch.float16)


def _cuda(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.cuda() for t in tensors)


def _max_error(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[float, float]:
    """(max abs error of the kernels on the GPU vs the reference on the CPU, its tolerance)."""
    qk, v, rotations, mask = inputs(case, dtype, seed)
    out = lsh_attention_triton(*_cuda((qk, v, rotations, mask)), case.attrs)
    assert out.dtype == dtype and out.shape == qk.shape and out.is_cuda
    ref = lsh_attention_reference(qk, v, rotations, mask, case.attrs)
    return (out.float().cpu() - ref.float()).abs().max().item(), tolerance(v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_attention_matches_reference(case: Case, dtype: torch.dtype) -> None:
    error, limit = _max_error(case, dtype)
    assert error <= limit


@pytest.mark.parametrize("case", CASES, ids=str)
def test_interpreter_cases_match_reference_compiled(case: Case) -> None:
    error, limit = _max_error(case, torch.float32)
    assert error <= limit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_HASHED_CASES, ids=str)
def test_buckets_and_order_equal_reference(case: Case, dtype: torch.dtype) -> None:
    qk, _, rotations, mask = inputs(case, dtype, seed=3)
    qk[0, 0, :2] = 0  # all-zero rotations: every candidate ties, the first must win
    buckets = lsh_hash_triton(*_cuda((qk, rotations, mask)), case.attrs)
    ref_buckets = lsh_hash(qk, rotations, mask, case.attrs)
    assert torch.equal(buckets.long().cpu(), ref_buckets)
    assert torch.equal(lsh_sort_triton(buckets).cpu(), lsh_sort(ref_buckets))


def test_buckets_equal_reference_many_draws() -> None:
    drawn = make_case(2, 4, 2048, 64, 4, (16, 8), 128, 1, 0, False, True)
    for seed in range(4):
        qk, _, rotations, mask = inputs(drawn, torch.float32, seed=seed)
        qk = qk * 10.0**(seed - 2)  # scale changes nothing in exact arithmetic; rounding must not either
        buckets = lsh_hash_triton(*_cuda((qk, rotations, mask)), drawn.attrs)
        assert torch.equal(buckets.long().cpu(), lsh_hash(qk, rotations, mask, drawn.attrs))


def test_rows_that_see_only_masked_keys_round_like_the_reference() -> None:
    """Mostly padding, two chunks before: rows that see only masked keys and themselves have |lse| ~ 1e5."""
    attrs = LSHAttrs(2, (4,), 64, 2, 0, True)
    qk, v, rotations, mask = inputs(Case(2, 2, 128, 64, attrs, False), torch.float32, seed=11)
    mask[:, 5:] = 0
    out = lsh_attention_triton(*_cuda((qk, v, rotations, mask)), attrs).cpu()
    assert (out - lsh_attention_reference(qk, v, rotations, mask, attrs)).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_equal_contiguous(dtype: torch.dtype) -> None:
    case = GPU_CASES[0]
    qk, v, rotations, mask = _cuda(inputs(case, dtype))
    # The model's layout: [B,L,H,D] memory viewed as [B,H,L,D].
    qk_view, v_view = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (qk, v))
    assert not qk_view.is_contiguous()
    out = lsh_attention_triton(qk_view, v_view, rotations, mask, case.attrs)
    assert torch.equal(out, lsh_attention_triton(qk, v, rotations, mask, case.attrs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_runs_are_bitwise_identical(dtype: torch.dtype) -> None:
    """Many programs write disjoint rows; a race or an unordered reduction would show as a changed bit."""
    case = GPU_CASES[1]
    args = _cuda(inputs(case, dtype, seed=5))
    first = lsh_attention_triton(*args, case.attrs)
    for _ in range(3):
        assert torch.equal(lsh_attention_triton(*args, case.attrs), first)
