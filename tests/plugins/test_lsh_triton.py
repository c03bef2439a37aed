"""Triton LSH kernels under Triton's CPU interpreter against the fp32 reference of the op contract.

Criteria (``reformer_rt.plugins.parity``): fp32 max abs error <= 1e-5, bucket ids and sort order equal element for
element; fp16 within ``4 * 2^-11 * max|v|`` of the reference on the same fp16 inputs. The case table is shared with
the compiled-kernel tests in ``tests/gpu`` (``tests/helpers/lsh_cases.py``); shapes are small because the interpreter
runs each program in Python.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels are built for the interpreter

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from helpers.lsh_cases import CASES, FP16_CASES, HASHED_CASES, Case, inputs, make_case, small_lm  # noqa: E402
from reformer_rt.models import LSHAttrs, lsh_attention  # noqa: E402
from reformer_rt.models.errors import InputError, ReformerError  # noqa: E402
from reformer_rt.models.lsh import lsh_attention_reference, lsh_hash, lsh_sort  # noqa: E402
from reformer_rt.models.lsh_op import forced_kernels  # noqa: E402
from reformer_rt.plugins import lsh_triton  # noqa: E402
from reformer_rt.plugins.kernels import _lsh_attend_kernel  # noqa: E402
from reformer_rt.plugins.lsh_triton import lsh_attention_triton, lsh_hash_triton, lsh_sort_triton  # noqa: E402
from reformer_rt.plugins.parity import FP32_TOL, tolerance  # noqa: E402

if not isinstance(_lsh_attend_kernel, InterpretedFunction):
    pytest.skip("the kernels were imported without TRITON_INTERPRET=1 (by an earlier test module?); run "
                "tests/plugins on its own or with TRITON_INTERPRET=1 set", allow_module_level=True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_fp32_matches_reference(case: Case) -> None:
    qk, v, rotations, mask = inputs(case, torch.float32)
    out = lsh_attention_triton(qk, v, rotations, mask, case.attrs)
    ref = lsh_attention_reference(qk, v, rotations, mask, case.attrs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_attention_fp16_matches_reference_on_fp16inputs(case: Case) -> None:
    qk, v, rotations, mask = inputs(case, torch.float16)
    out = lsh_attention_triton(qk, v, rotations, mask, case.attrs)
    ref = lsh_attention_reference(qk, v, rotations, mask, case.attrs)
    assert out.dtype == torch.float16
    assert (out.float() - ref.float()).abs().max().item() <= tolerance(v)


def test_rows_that_see_only_masked_keys_round_like_the_reference() -> None:
    """Two chunks per round, two chunks before, mostly padding: rows 16..31 see only masked keys and themselves,
    twice in every round (each window holds their chunk twice).

    Their |lse| ~ 1e5, where fp32 weights exp(score - lse) sum to 1 only up to the rounding of lse; the kernels
    must round as the reference does (an exact 1/l normalisation is off by ~1e-3 here).
    """
    attrs = LSHAttrs(2, (4,), 16, 2, 0, True)
    case = Case(2, 2, 32, 16, attrs, False)
    qk, v, rotations, mask = inputs(case, torch.float32, seed=11)
    mask[:, 5:] = 0
    out = lsh_attention_triton(qk, v, rotations, mask, attrs)
    assert (out - lsh_attention_reference(qk, v, rotations, mask, attrs)).abs().max().item() <= FP32_TOL


def test_strided_inputs_match_contiguous() -> None:
    case = CASES[1]
    qk, v, rotations, mask = inputs(case, torch.float32)
    # The model's layout: [B,L,H,D] memory viewed as [B,H,L,D].
    qk_view = qk.transpose(1, 2).contiguous().transpose(1, 2)
    v_view = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qk_view.is_contiguous()
    out = lsh_attention_triton(qk_view, v_view, rotations, mask, case.attrs)
    assert torch.equal(out, lsh_attention_triton(qk, v, rotations, mask, case.attrs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", HASHED_CASES, ids=str)
def test_buckets_and_order_equal_reference(case: Case, dtype: torch.dtype) -> None:
    qk, _, rotations, mask = inputs(case, dtype, seed=3)
    qk[0, 0, :2] = 0  # all-zero rotations: every candidate ties, the first must win
    buckets = lsh_hash_triton(qk, rotations, mask, case.attrs)
    ref_buckets = lsh_hash(qk, rotations, mask, case.attrs)
    assert torch.equal(buckets.long(), ref_buckets)
    assert torch.equal(lsh_sort_triton(buckets), lsh_sort(ref_buckets))


def test_buckets_equal_reference_many_draws() -> None:
    drawn = make_case(2, 2, 256, 32, 4, (8, 4), 32, 1, 0, False, True)
    for seed in range(4):
        qk, _, rotations, mask = inputs(drawn, torch.float32, seed=seed)
        qk = qk * 10.0**(seed - 2)  # scale changes nothing in exact arithmetic; rounding must not either
        buckets = lsh_hash_triton(qk, rotations, mask, drawn.attrs)
        assert torch.equal(buckets.long(), lsh_hash(qk, rotations, mask, drawn.attrs))


def test_repeated_runs_are_bitwise_identical() -> None:
    case = CASES[3]
    qk, v, rotations, mask = inputs(case, torch.float32, seed=5)
    first = lsh_attention_triton(qk, v, rotations, mask, case.attrs)
    for _ in range(2):
        assert torch.equal(lsh_attention_triton(qk, v, rotations, mask, case.attrs), first)


def test_bad_inputs_are_rejected_with_the_fix() -> None:
    case = CASES[1]
    qk, v, rotations, mask = inputs(case, torch.float32)
    with pytest.raises(InputError, match="int32"):
        lsh_attention_triton(qk, v, rotations, mask.long(), case.attrs)
    with pytest.raises(InputError, match="pad the sequence"):
        lsh_attention_triton(qk[:, :, :100], v[:, :, :100], rotations, mask[:, :100], case.attrs)
    with pytest.raises(InputError, match="rotations"):
        lsh_attention_triton(qk, v, rotations[..., :1], mask, case.attrs)
    wide = LSHAttrs(1, (2 * lsh_triton.MAX_ROTATION_HALF + 2,), 32)
    with pytest.raises(InputError, match="reference"):
        lsh_attention_triton(qk, v, torch.zeros(wide.rotations_shape(2, 32)), mask, wide)


def test_every_launch_the_launchers_make_is_a_compiled_specialization(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``compile_check`` compiles (``specializations()``) covers what the launchers really launch."""
    compiled = {launch.key() for launch in lsh_triton.specializations().values()}
    launched = []
    run = lsh_triton.KernelLaunch.run
    monkeypatch.setattr(lsh_triton.KernelLaunch, "run", lambda self: (launched.append(self.key()), run(self)))
    for dtype, cases in ((torch.float32, CASES), (torch.float16, FP16_CASES)):
        for c in cases:
            lsh_attention_triton(*inputs(c, dtype), c.attrs)
    assert len(set(launched)) > 10 and set(launched) <= compiled


def test_model_logits_triton_equal_reference() -> None:
    model = small_lm()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 40, (2, 90), generator=generator)  # padded to 96 inside the model
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 70:] = 0
    logits = {}
    for kernels in ("reference", "triton"):
        with torch.no_grad(), forced_kernels(kernels):
            logits[kernels] = model(input_ids, attention_mask)
    assert (logits["triton"] - logits["reference"]).abs().max().item() <= FP32_TOL


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[1]
    qk, v, rotations, mask = inputs(case, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with torch.no_grad(), forced_kernels("triton"), pytest.raises(ReformerError, match="TRITON_INTERPRET=1"):
        lsh_attention(qk, v, rotations, mask, case.attrs)


def test_import_without_triton_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "reformer_rt.plugins" or m.startswith("reformer_rt.plugins.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(ImportError, match="pip install triton"):
        importlib.import_module("reformer_rt.plugins")
