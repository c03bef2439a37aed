"""Tables and targets of the GPU benchmark (``bench/gpu.py``) and of the headline run (``make gpu-check``).

Each measurement is a ``harness.Point``: median seconds; ``peak_bytes`` = the whole device allocation at its peak,
weights and inputs included, and ``details["extra_bytes"]`` = that peak over what was allocated before the call.
Tables give ms and GB (2^30 bytes, as the reference figures in BENCHMARKS.md). A ``Target`` is one goal of the GPU
issue judged on those points: met or missed, with measured / limit as its ratio. The limits come from H200
measurements of HF and of dense FlashAttention (BENCHMARKS.md); on another GPU the ratios are indicative. Memory
targets use extra memory for the op (what the op adds) and total memory for whole models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .harness import Point, markdown_table

LAYER, MODEL, HEADLINE = "LSH layer", "12-layer model", "headline 524,288 tokens"
OURS_OP, DENSE_OP = "ours (op)", "dense causal SDPA (op)"
OURS_MODEL, HF_MODEL, DENSE_MODEL = "ours ReformerModel", "HF ReformerModel", "dense flash transformer"
GIB = 2**30
EXTRA_BYTES = "extra_bytes"  # the key of a Point's details: peak allocation over what was allocated before the call


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

    def to_json(self) -> dict[str, object]:
        """Its fields with its verdict (``ratio``, ``met``: what ``make gpu-check`` reads back)."""
        return {**dataclasses.asdict(self), "ratio": self.ratio, "met": self.met}


def _find(points: Sequence[Point], what: str, impl: str, length: int) -> Point | None:
    return next((p for p in points if (p.what, p.impl, p.length) == (what, impl, length) and p.error is None), None)


def _ms(point: Point | None) -> float | None:
    return None if point is None else point.ms


def _gb(point: Point | None, extra: bool = False) -> float | None:
    """Peak GB of ``point``: the whole allocation, or with ``extra`` what the call added to it."""
    if point is None:
        return None
    value = point.details.get(EXTRA_BYTES) if extra else point.peak_bytes
    return None if value is None else value / GIB


def benchmark_targets(points: Sequence[Point]) -> list[Target]:
    """The op and 12-layer targets on ``bench/gpu.py`` points (fp16, B=1)."""
    op = _find(points, LAYER, OURS_OP, 65536)
    ours = {n: _find(points, MODEL, OURS_MODEL, n) for n in (16384, 65536)}
    dense = {n: _find(points, MODEL, DENSE_MODEL, n) for n in (16384, 65536)}
    targets = [Target("LSH op at 64K: time", _ms(op), 2.0, "ms"),
               Target("LSH op at 64K: extra memory", _gb(op, extra=True), 0.5, "GB"),
               Target("12-layer model at 64K: time", _ms(ours[65536]), 60.0, "ms"),
               Target("12-layer model at 64K: memory", _gb(ours[65536]), 1.5, "GB"),
               Target("12-layer model at 16K: time", _ms(ours[16384]), 15.0, "ms")]
    for n in (16384, 65536):
        mine, theirs = _ms(ours[n]), _ms(dense[n])
        ratio = None if mine is None or theirs is None else mine / theirs
        targets.append(Target(f"12-layer model at {n // 1024}K vs dense flash: time ratio", ratio, 1.0, "x"))
    short, long = _ms(ours[16384]), _ms(ours[65536])
    scaling = None if short is None or long is None else long / short
    targets.append(Target("12-layer model: time(64K) / time(16K)", scaling, 4.3, "x"))
    return targets


def headline_targets(point: Point | None) -> list[Target]:
    """The headline: crime-and-punishment architecture, 524,288 tokens, B=1, fp16 (limits for an H100)."""
    return [Target("headline 524K fp16: time", _ms(point), 150.0, "ms"),
            Target("headline 524K fp16: memory", _gb(point), 4.0, "GB")]


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _short(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def format_table(points: Sequence[Point], device: str, date: str) -> str:
    """Markdown: a title line naming the device and date, then one row per measurement."""
    title = (f"Benchmark on {device}, {date} (fp16; ms = median; extra GB = peak over what was allocated before "
             "the call; total GB = peak device allocation)")
    rows = [(p.what, p.length, p.impl, _cell(p.ms, 3), _cell(_gb(p, extra=True), 3), _cell(_gb(p), 3))
            for p in points]
    return title + "\n\n" + markdown_table(("what", "L", "impl", "ms", "peak extra GB", "peak total GB"), rows)


def format_parity(rows: Sequence[ParityRow]) -> str:
    return markdown_table(
        ("L", "dtype", "max abs err", "tolerance", "bucket mismatches", "ok"),
        [(p.length, p.dtype, _short(p.max_abs_err), _short(p.tolerance),
          "n/a" if p.bucket_mismatches is None else p.bucket_mismatches, "yes" if p.ok else "NO") for p in rows])


def format_targets(targets: Sequence[Target]) -> str:
    return markdown_table(
        ("target", "measured", "limit", "ratio", ""),
        [(t.what, "n/a" if t.measured is None else f"{t.measured:.3g} {t.unit}", f"{t.limit:g} {t.unit}",
          "n/a" if t.ratio is None else f"{t.ratio:.2f}", "met" if t.met else "missed") for t in targets])
