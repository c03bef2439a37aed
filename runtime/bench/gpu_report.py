"""Rows, tables and targets of the GPU benchmark (``bench/gpu.py``) and of the headline run (``make gpu-check``).

A ``Timing`` is one measurement (median ms; peak memory as ``peak_gb`` = extra over what was allocated before the
call, and ``total_gb`` = the whole device allocation at its peak, weights and inputs included). A ``Target`` is one
goal of the GPU issue judged on those rows: met or missed, with measured / limit as its ratio. The limits come from
H200 measurements of HF and of dense FlashAttention (BENCHMARKS.md); on another GPU the ratios are indicative.
Memory targets use extra memory for the op (what the op adds) and total memory for whole models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

LAYER, MODEL, HEADLINE = "LSH layer", "12-layer model", "headline 524,288 tokens"
OURS_OP, DENSE_OP = "ours (op)", "dense causal SDPA (op)"
OURS_MODEL, HF_MODEL, DENSE_MODEL = "ours ReformerModel", "HF ReformerModel", "dense flash transformer"


@dataclasses.dataclass(frozen=True)
class Timing:
    what: str
    length: int
    impl: str
    ms: float | None
    peak_gb: float | None
    total_gb: float | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ParityRow:
    """The kernels vs the reference at one length and dtype (``reformer_rt.plugins.parity.compare``)."""

    length: int
    dtype: str
    max_abs_err: float | None
    tolerance: float | None
    bucket_mismatches: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_abs_err is not None and self.tolerance is not None \
            and self.max_abs_err <= self.tolerance and self.bucket_mismatches == 0


@dataclasses.dataclass(frozen=True)
class Target:
    what: str
    measured: float | None  # None: the measurement failed or is missing, which counts as missed
    limit: float
    unit: str

    @property
    def ratio(self) -> float | None:
        return None if self.measured is None else self.measured / self.limit

    @property
    def met(self) -> bool:
        return self.measured is not None and self.measured <= self.limit


def _find(rows: Sequence[Timing], what: str, impl: str, length: int) -> Timing | None:
    return next((r for r in rows if (r.what, r.impl, r.length) == (what, impl, length) and r.error is None), None)


def _value(row: Timing | None, field: str) -> float | None:
    return None if row is None else getattr(row, field)


def benchmark_targets(rows: Sequence[Timing]) -> list[Target]:
    """The op and 12-layer targets on ``bench/gpu.py`` rows (fp16, B=1)."""
    op = _find(rows, LAYER, OURS_OP, 65536)
    ours = {n: _find(rows, MODEL, OURS_MODEL, n) for n in (16384, 65536)}
    dense = {n: _find(rows, MODEL, DENSE_MODEL, n) for n in (16384, 65536)}
    targets = [Target("LSH op at 64K: time", _value(op, "ms"), 2.0, "ms"),
               Target("LSH op at 64K: extra memory", _value(op, "peak_gb"), 0.5, "GB"),
               Target("12-layer model at 64K: time", _value(ours[65536], "ms"), 60.0, "ms"),
               Target("12-layer model at 64K: memory", _value(ours[65536], "total_gb"), 1.5, "GB"),
               Target("12-layer model at 16K: time", _value(ours[16384], "ms"), 15.0, "ms")]
    for n in (16384, 65536):
        mine, theirs = _value(ours[n], "ms"), _value(dense[n], "ms")
        ratio = None if mine is None or theirs is None else mine / theirs
        targets.append(Target(f"12-layer model at {n // 1024}K vs dense flash: time ratio", ratio, 1.0, "x"))
    short, long = _value(ours[16384], "ms"), _value(ours[65536], "ms")
    scaling = None if short is None or long is None else long / short
    targets.append(Target("12-layer model: time(64K) / time(16K)", scaling, 4.3, "x"))
    return targets


def headline_targets(row: Timing | None) -> list[Target]:
    """The headline: crime-and-punishment architecture, 524,288 tokens, B=1, fp16 (limits for an H100)."""
    return [Target("headline 524K fp16: time", _value(row, "ms"), 150.0, "ms"),
            Target("headline 524K fp16: memory", _value(row, "total_gb"), 4.0, "GB")]


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _short(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def format_table(rows: Sequence[Timing], device: str, date: str) -> str:
    """Markdown: a title line naming the device and date, then one row per measurement."""
    title = (f"Benchmark on {device}, {date} (fp16; ms = median; extra GB = peak over what was allocated before "
             "the call; total GB = peak device allocation)")
    lines = [title, "",
             "| what | L | impl | ms | peak extra GB | peak total GB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.length} | {r.impl} | {_cell(r.ms, 3)} | {_cell(r.peak_gb, 3)} | "
              f"{_cell(r.total_gb, 3)} |" for r in rows]
    return "\n".join(lines)


def format_parity(rows: Sequence[ParityRow]) -> str:
    lines = ["| L | dtype | max abs err | tolerance | bucket mismatches | ok |", "|---|---|---|---|---|---|"]
    for p in rows:
        buckets = "n/a" if p.bucket_mismatches is None else p.bucket_mismatches
        lines.append(f"| {p.length} | {p.dtype} | {_short(p.max_abs_err)} | {_short(p.tolerance)} | {buckets} | "
                     f"{'yes' if p.ok else 'NO'} |")
    return "\n".join(lines)


def format_targets(targets: Sequence[Target]) -> str:
    lines = ["| target | measured | limit | ratio | |", "|---|---|---|---|---|"]
    for t in targets:
        measured = "n/a" if t.measured is None else f"{t.measured:.3g} {t.unit}"
        ratio = "n/a" if t.ratio is None else f"{t.ratio:.2f}"
        lines.append(f"| {t.what} | {measured} | {t.limit:g} {t.unit} | {ratio} | {'met' if t.met else 'missed'} |")
    return "\n".join(lines)
