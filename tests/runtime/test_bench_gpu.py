"""The GPU benchmark's parts that run anywhere: arguments, tables, targets, the dense baseline's shapes, and the
no-GPU exit. (Its measurements need a GPU: ``make gpu-check`` runs them.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from reformer_rt.runtime.bench import gpu as bench_gpu  # noqa: E402
from reformer_rt.runtime.bench.dense_baseline import DenseTransformer  # noqa: E402
from reformer_rt.runtime.bench.gpu_report import (  # noqa: E402
    DENSE_MODEL, EXTRA_BYTES, GIB, LAYER, MODEL, OURS_MODEL, OURS_OP, Target, benchmark_targets, format_table,
    format_targets, headline_targets,
)
from reformer_rt.runtime.bench.harness import Point  # noqa: E402


def _timed(what: str, length: int, impl: str, ms: float, extra_gb: float, total_gb: float) -> Point:
    """A GPU measurement as ``bench.gpu.timed`` records it, from ms and GB."""
    return Point(what, impl, length, seconds=ms / 1e3, peak_bytes=round(total_gb * GIB),
                 details={EXTRA_BYTES: round(extra_gb * GIB)})


def test_bench_arguments_and_table() -> None:
    args = bench_gpu.parse_args(["--out", "bench-out", "--lengths", "4096", "16384", "--skip-model", "--profile"])
    assert args.out == "bench-out" and args.lengths == [4096, 16384] and args.skip_model and args.profile
    assert bench_gpu.parse_args(["--out", "d"]).lengths == list(bench_gpu.DEFAULT_LENGTHS)
    rows = [_timed("layer", 4096, "ours", 1.25, 0.5, 0.75), Point("layer", "hf", 4096)]
    lines = format_table(rows, device="GPU X", date="2030-01-01").splitlines()
    assert "GPU X" in lines[0] and "2030-01-01" in lines[0]
    assert lines[2].startswith("| what |") and lines[3].startswith("|---")
    assert "| layer | 4096 | ours | 1.250 | 0.500 | 0.750 |" in lines
    assert "| layer | 4096 | hf | n/a | n/a | n/a |" in lines


def test_targets_are_met_or_missed_with_their_ratio() -> None:
    rows = [_timed(LAYER, 65536, OURS_OP, 1.5, 0.25, 2.0), _timed(MODEL, 16384, OURS_MODEL, 10.0, 0.2, 0.9),
            _timed(MODEL, 65536, OURS_MODEL, 50.0, 0.5, 1.2), _timed(MODEL, 16384, DENSE_MODEL, 20.0, 0.1, 0.5),
            _timed(MODEL, 65536, DENSE_MODEL, 40.0, 0.3, 0.7)]
    targets = {t.what: t for t in benchmark_targets(rows)}
    assert targets["LSH op at 64K: time"].met and targets["LSH op at 64K: time"].ratio == pytest.approx(0.75)
    assert targets["12-layer model at 64K: memory"].measured == pytest.approx(1.2)  # whole models: total memory
    assert targets["12-layer model at 16K vs dense flash: time ratio"].met
    assert not targets["12-layer model at 64K vs dense flash: time ratio"].met  # 50 ms vs 40 ms
    assert not targets["12-layer model: time(64K) / time(16K)"].met  # 5.0 > 4.3
    missing = headline_targets(None)
    assert all(t.measured is None and not t.met for t in missing)
    table = format_targets([*targets.values(), *missing])
    assert "| LSH op at 64K: time | 1.5 ms | 2 ms | 0.75 | met |" in table
    assert "| headline 524K fp16: time | n/a | 150 ms | n/a | missed |" in table
    assert Target("x", 3.0, 2.0, "ms").ratio == 1.5


def test_dense_baseline_is_causal_and_keeps_the_width() -> None:
    model = DenseTransformer(vocab_size=11, d_model=32, heads=2, feed_forward=64, layers=2).eval()
    ids = torch.randint(0, 11, (2, 10))
    with torch.no_grad():
        full, prefix = model(ids), model(ids[:, :6])
    assert full.shape == (2, 10, 32)
    assert torch.allclose(full[:, :6], prefix, atol=1e-5)  # a position never sees a later one


def test_bench_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the no-GPU exit path is not reachable")
    with pytest.raises(SystemExit) as exc:
        bench_gpu.main(["--out", "unused"])
    assert exc.value.code == 2
    assert "CUDA" in capsys.readouterr().err
