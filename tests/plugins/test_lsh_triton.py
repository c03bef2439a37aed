"""Triton LSH kernels under Triton's CPU interpreter against the fp32 reference of the op contract.

fp32: max abs error <= 1e-5; bucket ids and sort order equal element for element. fp16: compared with the
reference run on the same fp16 inputs (it computes in fp32 and rounds its output to fp16). The kernels round the
softmax weights to fp16 for the p @ v dot (relative error <= u = 2^-11 each, so <= u * max|v| on the output),
keep per-round rows in fp16 (<= u * max|v| more) and round the output (two roundings of values that agree to the
above differ by at most their difference plus one ulp, <= 2u * max|v|): hence ``4 * u * max|v|``.
Shapes are small (L <= 256, D <= 32 but one D = 128 case): the interpreter runs each program in Python.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels are built for the interpreter

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from reformer_rt.models import LSHAttrs, ReformerConfig, ReformerLM, lsh_attention  # noqa: E402
from reformer_rt.models.errors import InputError, ReformerError  # noqa: E402
from reformer_rt.models.lsh import lsh_attention_reference, lsh_hash, lsh_sort, make_rotations  # noqa: E402
from reformer_rt.models.lsh_op import KERNELS_ENV  # noqa: E402
from reformer_rt.plugins import bench_gpu  # noqa: E402
from reformer_rt.plugins.kernels import _lsh_attend_kernel  # noqa: E402
from reformer_rt.plugins.lsh_triton import lsh_attention_triton, lsh_hash_triton, lsh_sort_triton  # noqa: E402

if not isinstance(_lsh_attend_kernel, InterpretedFunction):
    pytest.skip("the kernels were imported without TRITON_INTERPRET=1 (by an earlier test module?); run "
                "tests/plugins on its own or with TRITON_INTERPRET=1 set", allow_module_level=True)

FP32_TOL = 1e-5
FP16_UNIT_ROUNDOFF = 2.0**-11


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    length: int
    dim: int
    attrs: LSHAttrs
    padded: bool  # ragged mask: the last batch row loses a third of its tokens (or the only row a tail)

    def __str__(self) -> str:
        a = self.attrs
        factors = "x".join(map(str, a.bucket_factors))
        return (f"B{self.batch}H{self.heads}L{self.length}D{self.dim}-h{a.num_hashes}-b{factors}-c{a.chunk_length}"
                f"-{a.chunks_before}{a.chunks_after}{'-causal' if a.causal else ''}{'-pad' if self.padded else ''}")


def _case(batch: int, heads: int, length: int, dim: int, hashes: int, factors: tuple[int, ...], chunk: int,
          before: int, after: int, causal: bool, padded: bool) -> Case:
    return Case(batch, heads, length, dim, LSHAttrs(hashes, factors, chunk, before, after, causal), padded)


CASES = [
    _case(1, 1, 64, 16, 1, (4,), 16, 1, 0, True, False),
    _case(2, 2, 128, 32, 2, (8,), 32, 1, 0, True, True),
    _case(2, 1, 96, 24, 4, (4, 6), 24, 1, 1, False, True),   # factorized; D and chunk not powers of two
    _case(1, 2, 128, 32, 4, (2, 4), 32, 0, 1, True, True),
    _case(2, 2, 64, 16, 2, (4,), 16, 0, 0, False, True),
    _case(1, 1, 256, 32, 2, (16,), 64, 1, 0, True, True),    # several chunks per round
    _case(1, 1, 120, 16, 1, (6,), 40, 1, 0, True, True),     # key blocks straddle chunks, query rows masked
    _case(1, 1, 32, 16, 1, (4,), 16, 1, 1, False, False),    # window wider than the sequence: repeated chunks
    _case(1, 1, 64, 128, 2, (4,), 32, 1, 0, True, True),     # widest head
    _case(2, 2, 48, 32, 2, (4,), 64, 1, 0, True, True),      # L < chunk: full attention
    _case(1, 2, 64, 16, 1, (4,), 64, 0, 1, False, True),     # L == chunk: full attention
]
FP16_CASES = [CASES[1], CASES[2], CASES[5], CASES[9]]
HASHED_CASES = [c for c in CASES if c.length > c.attrs.chunk_length]


def _inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.heads, case.length, case.dim)
    qk = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    rotations = make_rotations(seed + 1, case.heads, case.dim, case.attrs)
    mask = torch.ones(case.batch, case.length, dtype=torch.int32)
    if case.padded:
        mask[-1, case.length - max(1, case.length // 3):] = 0
    return qk, v, rotations, mask


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_fp32_matches_reference(case: Case) -> None:
    qk, v, rotations, mask = _inputs(case, torch.float32)
    out = lsh_attention_triton(qk, v, rotations, mask, case.attrs)
    ref = lsh_attention_reference(qk, v, rotations, mask, case.attrs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_attention_fp16_matches_reference_on_fp16_inputs(case: Case) -> None:
    qk, v, rotations, mask = _inputs(case, torch.float16)
    out = lsh_attention_triton(qk, v, rotations, mask, case.attrs)
    ref = lsh_attention_reference(qk, v, rotations, mask, case.attrs)
    assert out.dtype == torch.float16
    tolerance = 4 * FP16_UNIT_ROUNDOFF * v.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= tolerance


def test_rows_that_see_only_masked_keys_round_like_the_reference() -> None:
    """Two chunks per round, two chunks before, mostly padding: rows 16..31 see only masked keys and themselves,
    twice in every round (each window holds their chunk twice).

    Their |lse| ~ 1e5, where fp32 weights exp(score - lse) sum to 1 only up to the rounding of lse; the kernels
    must round as the reference does (an exact 1/l normalisation is off by ~1e-3 here).
    """
    attrs = LSHAttrs(2, (4,), 16, 2, 0, True)
    case = Case(2, 2, 32, 16, attrs, False)
    qk, v, rotations, mask = _inputs(case, torch.float32, seed=11)
    mask[:, 5:] = 0
    out = lsh_attention_triton(qk, v, rotations, mask, attrs)
    assert (out - lsh_attention_reference(qk, v, rotations, mask, attrs)).abs().max().item() <= FP32_TOL


def test_strided_inputs_match_contiguous() -> None:
    case = CASES[1]
    qk, v, rotations, mask = _inputs(case, torch.float32)
    # The model's layout: [B,L,H,D] memory viewed as [B,H,L,D].
    qk_view = qk.transpose(1, 2).contiguous().transpose(1, 2)
    v_view = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qk_view.is_contiguous()
    out = lsh_attention_triton(qk_view, v_view, rotations, mask, case.attrs)
    assert torch.equal(out, lsh_attention_triton(qk, v, rotations, mask, case.attrs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", HASHED_CASES, ids=str)
def test_buckets_and_order_equal_reference(case: Case, dtype: torch.dtype) -> None:
    qk, _, rotations, mask = _inputs(case, dtype, seed=3)
    qk[0, 0, :2] = 0  # all-zero rotations: every candidate ties, the first must win
    buckets = lsh_hash_triton(qk, rotations, mask, case.attrs)
    ref_buckets = lsh_hash(qk, rotations, mask, case.attrs)
    assert torch.equal(buckets.long(), ref_buckets)
    assert torch.equal(lsh_sort_triton(buckets), lsh_sort(ref_buckets))


def test_buckets_equal_reference_many_draws() -> None:
    case = _case(2, 2, 256, 32, 4, (8, 4), 32, 1, 0, False, True)
    for seed in range(4):
        qk, _, rotations, mask = _inputs(case, torch.float32, seed=seed)
        qk = qk * 10.0**(seed - 2)  # scale changes nothing in exact arithmetic; rounding must not either
        buckets = lsh_hash_triton(qk, rotations, mask, case.attrs)
        assert torch.equal(buckets.long(), lsh_hash(qk, rotations, mask, case.attrs))


def test_repeated_runs_are_bitwise_identical() -> None:
    case = CASES[3]
    qk, v, rotations, mask = _inputs(case, torch.float32, seed=5)
    first = lsh_attention_triton(qk, v, rotations, mask, case.attrs)
    for _ in range(2):
        assert torch.equal(lsh_attention_triton(qk, v, rotations, mask, case.attrs), first)


def test_bad_inputs_are_rejected_with_the_fix() -> None:
    case = CASES[1]
    qk, v, rotations, mask = _inputs(case, torch.float32)
    with pytest.raises(InputError, match="int32"):
        lsh_attention_triton(qk, v, rotations, mask.long(), case.attrs)
    with pytest.raises(InputError, match="pad the sequence"):
        lsh_attention_triton(qk[:, :, :100], v[:, :, :100], rotations, mask[:, :100], case.attrs)
    with pytest.raises(InputError, match="rotations"):
        lsh_attention_triton(qk, v, rotations[..., :1], mask, case.attrs)


def _small_lm() -> ReformerLM:
    config = ReformerConfig(
        vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
        attn_layers=("lsh", "local", "lsh"), feed_forward_size=64, is_decoder=True,
        axial_pos_shape=(8, 16), axial_pos_embds_dim=(16, 16), max_position_embeddings=128,
        lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=2, num_buckets=(2, 4), hash_seed=7,
    )
    torch.manual_seed(0)
    model = ReformerLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def test_model_logits_triton_equal_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _small_lm()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 40, (2, 90), generator=generator)  # padded to 96 inside the model
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 70:] = 0
    logits = {}
    for kernels in ("reference", "triton"):
        monkeypatch.setenv(KERNELS_ENV, kernels)
        with torch.no_grad():
            logits[kernels] = model(input_ids, attention_mask)
    assert (logits["triton"] - logits["reference"]).abs().max().item() <= FP32_TOL


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[1]
    qk, v, rotations, mask = _inputs(case, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv(KERNELS_ENV, "triton")
    with torch.no_grad(), pytest.raises(ReformerError, match="TRITON_INTERPRET=1"):
        lsh_attention(qk, v, rotations, mask, case.attrs)


def test_import_without_triton_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "reformer_rt.plugins" or m.startswith("reformer_rt.plugins.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(ImportError, match="pip install triton"):
        importlib.import_module("reformer_rt.plugins")


def test_bench_arguments_and_table() -> None:
    args = bench_gpu.parse_args(["--out", "bench-out", "--lengths", "4096", "16384", "--skip-model"])
    assert args.out == "bench-out" and args.lengths == [4096, 16384] and args.skip_model
    assert bench_gpu.parse_args(["--out", "d"]).lengths == list(bench_gpu.DEFAULT_LENGTHS)
    rows = [bench_gpu.Timing("layer", 4096, "ours", 1.25, 0.5), bench_gpu.Timing("layer", 4096, "hf", None, None)]
    table = bench_gpu.format_table(rows, device="GPU X", date="2030-01-01")
    lines = table.splitlines()
    assert "GPU X" in lines[0] and "2030-01-01" in lines[0]
    assert lines[2].startswith("| what |") and lines[3].startswith("|---")
    assert "| layer | 4096 | ours | 1.250 | 0.500 |" in lines
    assert "| layer | 4096 | hf | n/a | n/a |" in lines


def test_bench_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the no-GPU exit path is not reachable")
    with pytest.raises(SystemExit) as exc:
        bench_gpu.main(["--out", "unused"])
    assert exc.value.code == 2
    assert "CUDA" in capsys.readouterr().err
