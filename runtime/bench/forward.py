"""``reformer-rt bench``: latency, throughput and peak memory vs length and batch, every backend side by side.

Each (backend, batch, length) point runs in a fresh worker process (``harness.measure_in_workers``), so its peak
memory (``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own; the baseline -- HF
transformers eager on the same weights, when transformers is installed -- runs in the same invocation, the same
way. Backends ``torch-int8`` and ``onnxruntime-int8`` run the same weights with int8 weight products (the torch
backend's dynamic quantization; an int8 portable export, made once before timing); each int8 row is compared with
its backend's float row of the same run (``vs fp32``: time and peak memory ratios); ``--keep-float`` chooses which
parts of the LSH hashing path they keep float (default: both, as ``reformer-rt export --quantize int8``). Timings
are the median of ``--repeat`` runs after one warm-up run. Without a MODEL argument the model is ``--arch`` with
random weights: ``crime-and-punishment`` (6 layers local/LSH, d=256, 2 heads x 128, 1 hash round,
chunk 64, axial 512 x 1024) or ``enwik8-like`` (6 layers local/LSH, d=512, 8 heads x 64, 4 hash rounds, chunk 128,
buckets 32 x 32). ``--profile`` adds, for each ONNX Runtime point, one profiled run and its time per operator type.

Writes ``bench.json`` and ``bench.png`` (matplotlib) into ``--out`` (together, atomically) and prints a markdown
table with the machine. Every Session point opens the checkpoint, as a user's ``Session(checkpoint)`` does, so rows
of at least 65,536 tokens on torch and ONNX Runtime run streamed (``streaming.py``); the ONNX Runtime points' portable
exports (float and int8) and piece graphs are made once before timing in the run's own export cache (export time is
not counted). Arguments, the model and ``--out`` are checked before any work. A point that fails is recorded with its
error and the command exits non-zero: 2 when every failure is a user error (a length over the model's maximum, a
backend that is not installed), else 1. The worker, the report's machine and versions, the table, the plot and
the exit code are the harness's (``harness.py``); this module holds the forward pass and its arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from reformer_rt.export.metadata import HASHING_PARTS, Quantization
from reformer_rt.models import InputError, ReformerConfig, ReformerLM
from reformer_rt.models.checkpoint import CONFIG_FILE
from reformer_rt.models.presets import ARCHITECTURES

from ..artifacts import CACHE_ENV, cached_export, cached_pieces, write_files_atomic
from .harness import (
    Panel, Point, Provenance, answer_worker, check_failures, has_transformers, json_bytes, line_plot, make_out_dir,
    markdown_table, measure_in_workers, parse_ints, peak_memory,
)

if TYPE_CHECKING:  # numpy is imported where the work is, not at CLI start-up
    import numpy as np

COMMAND, WHAT = "bench", "forward"
PROFILE_TOP = 12  # operator types listed per profiled point
INT8 = "-int8"  # the suffix of a backend run with int8 weight products
BACKENDS = ("torch", "onnxruntime", "tensorrt", "torch" + INT8, "onnxruntime" + INT8)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="latency / throughput / peak memory per backend, with the HF baseline "
                              "(reformer-rt bench serve: load a server)", description=__doc__.split("\n\n")[0],
                              epilog="reformer-rt bench serve --help: the concurrency sweep against a KServe v2 "
                                     "server; reformer-rt bench accuracy --help: what int8 costs on text")
    p.add_argument("model", nargs="?", type=Path, help="checkpoint directory (default: --arch with random weights)")
    p.add_argument("--arch", default="crime-and-punishment", help=f"without MODEL: {', '.join(ARCHITECTURES)}")
    p.add_argument("--lengths", default="16384,65536", help="comma-separated sequence lengths")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes")
    p.add_argument("--backends", default="torch,onnxruntime", help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    p.add_argument("--keep-float", default=",".join(HASHING_PARTS), metavar="PARTS",
                   help=f"int8 backends: the parts of the LSH hashing path left float, from {', '.join(HASHING_PARTS)}"
                        " or 'none' (default: both)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every backend (default: all)")
    p.add_argument("--profile", action="store_true", help="ONNX Runtime points: one more run, profiled; time per "
                   "operator type")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


@dataclasses.dataclass(frozen=True)
class ForwardSpec:
    """One point: ``repeat`` timed forward passes of ``backend`` over random ids [batch, length]."""

    backend: str  # "hf" (the transformers baseline) or a Session backend
    batch: int
    length: int
    repeat: int
    threads: int
    profile: bool
    checkpoint: str
    onnx: str | None  # the cached portable export the onnxruntime backends open (int8 for onnxruntime-int8)
    keep_float: tuple[str, ...] = ()  # int8 backends: the hashing parts left float

    def pending(self) -> Point:
        return Point(WHAT, self.backend, self.length, self.batch)


# ----------------------------------------------------------------------------------------------------- worker
def _worker(spec: ForwardSpec) -> Point:
    """One measurement in this (fresh) process: load, warm up, time ``repeat`` runs."""
    import numpy as np
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    config = ReformerConfig.from_json_file(Path(spec.checkpoint) / CONFIG_FILE)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (spec.batch, spec.length), dtype=np.int64)
    cuda = torch.cuda.is_available()
    step = _hf_step(spec.checkpoint, ids, cuda) if spec.backend == "hf" else _session_step(spec, ids)
    times = []
    for i in range(spec.repeat + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
    peak, memory = peak_memory(cuda)
    profiled = spec.profile and spec.backend.startswith("onnxruntime")
    details = {"profile": _profile(spec.onnx or spec.checkpoint, ids, spec.threads)} if profiled else {}
    return dataclasses.replace(spec.pending(), seconds=statistics.median(times), peak_bytes=peak, memory=memory,
                               details=details)


def _hf_step(checkpoint: str, ids: np.ndarray, cuda: bool) -> Callable[[], None]:
    import torch
    import transformers

    model = transformers.ReformerModelWithLMHead.from_pretrained(checkpoint).eval()
    model = model.cuda() if cuda else model
    tensor = torch.from_numpy(ids).to("cuda" if cuda else "cpu")

    def step() -> None:
        with torch.inference_mode():
            model(tensor)

    return step


def _session_step(spec: ForwardSpec, ids: np.ndarray) -> Callable[[], None]:
    from ..session import Session

    backend, int8 = spec.backend.removesuffix(INT8), spec.backend.endswith(INT8)
    session = Session(spec.checkpoint, backend=backend, threads=spec.threads,
                      max_tokens_per_batch=spec.batch * spec.length,
                      quantize=Quantization("int8", spec.keep_float) if int8 else None)
    assert (session.quantization is not None) == int8, f"{spec.backend}: runs {session.quantization}"
    return lambda: session.run(ids)


def _profile(path: str, ids: np.ndarray, threads: int) -> dict[str, float]:
    """Seconds per operator type in a profiled ONNX Runtime run after a warm-up run (kernel time; an ``If``
    includes its branch)."""
    import collections

    import numpy as np
    import onnxruntime as ort

    from reformer_rt.export.metadata import GRAPH_INPUTS

    feeds = dict(zip(GRAPH_INPUTS, (ids, np.ones_like(ids))))
    with tempfile.TemporaryDirectory(prefix="reformer-rt-profile-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = True
        options.enable_mem_pattern = False  # as the backend runs it
        options.profile_file_prefix = str(Path(tmp) / "ort")
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(2):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    last_run = max(e["ts"] for e in events if e.get("name") == "model_run")
    per_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and event["ts"] >= last_run):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e6
    return {op: round(seconds, 4) for op, seconds in per_op.most_common(PROFILE_TOP)}


# ------------------------------------------------------------------------------------------------------ report
def table(points: list[Point]) -> str:
    """Markdown table; ``vs HF`` is the time ratio to the transformers row of the same batch and length, ``vs fp32``
    an int8 row's time and peak-memory ratios to its backend's float row (``int8_ratios``)."""
    base = {(p.batch, p.length): p.seconds for p in points if p.impl == "hf" and p.seconds is not None}
    ratios = int8_ratios(points)
    int8 = any(p.impl.endswith(INT8) for p in points)
    rows = []
    for p in points:
        if p.seconds is None or p.peak_bytes is None:
            rows.append((p.impl, p.batch, f"{p.length:,}", f"failed: {p.error}", "", "", "", *([""] * int8)))
            continue
        ref = base.get((p.batch, p.length))
        row = (p.impl, p.batch, f"{p.length:,}", f"{p.seconds:.3f}", f"{p.batch * p.length / p.seconds:,.0f}",
               f"{p.peak_bytes / 1e9:.2f}", f"{p.seconds / ref:.2f}x" if ref else "-")
        against = ratios.get((p.impl, p.batch, p.length))
        rows.append((*row, *([f"{1 / against[0]:.2f}x faster, memory {against[1]:.2f}x" if against else "-"] * int8)))
    header = ("backend", "batch", "length", "time (s)", "tokens/s", "peak memory (GB)", "vs HF")
    return markdown_table((*header, *(["vs fp32"] * int8)), rows)


def int8_ratios(points: list[Point]) -> dict[tuple[str, int, int], tuple[float, float]]:
    """(int8 time / float time, int8 peak / float peak) per int8 point whose backend's float point ran alongside."""
    measured = {(p.impl, p.batch, p.length): p for p in points if p.seconds is not None and p.peak_bytes is not None}
    out = {}
    for (impl, batch, length), p in measured.items():
        float_point = measured.get((impl.removesuffix(INT8), batch, length))
        if impl.endswith(INT8) and float_point is not None:
            out[(impl, batch, length)] = (p.seconds / float_point.seconds, p.peak_bytes / float_point.peak_bytes)
    return out


def _batch1(points: list[Point], gigabytes: bool = False) -> dict[str, list[tuple[int, float]]]:
    """(length, seconds) -- or (length, peak GB) -- at batch 1 per backend, by length."""
    return {impl: sorted((p.length, p.peak_bytes / 1e9 if gigabytes else p.seconds) for p in points
                         if p.impl == impl and p.batch == 1 and p.seconds is not None and p.peak_bytes is not None)
            for impl in sorted({p.impl for p in points})}


def scaling(points: list[Point]) -> dict[str, float]:
    """time(longest)/time(shortest) per backend at batch 1 -- linear scaling gives the length ratio."""
    return {impl: series[-1][1] / series[0][1] for impl, series in _batch1(points).items() if len(series) >= 2}


def _check_arguments(args: argparse.Namespace) -> tuple[list[int], list[int], list[str]]:
    """(lengths, batches, backends), every argument checked before any work; creates ``--out``."""
    lengths, batches = parse_ints(args.lengths, "--lengths"), parse_ints(args.batches, "--batches")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise InputError(f"--backends: got {args.backends!r}; expected some of {', '.join(BACKENDS)}")
    if args.repeat < 1 or args.threads < 0:
        raise InputError(f"--repeat / --threads: got {args.repeat} / {args.threads}; expected --repeat >= 1 and "
                         "--threads >= 0 (0 = all cores)")
    if args.model is not None and not args.model.is_dir():
        raise InputError(f"MODEL: got {args.model}; expected a checkpoint directory (config.json + weights)")
    if args.model is None and args.arch not in ARCHITECTURES:
        raise InputError(f"--arch: got {args.arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    config = ARCHITECTURES[args.arch] if args.model is None else ReformerConfig.from_json_file(args.model / CONFIG_FILE)
    too_long = [n for n in lengths if n > config.max_input_length]
    if too_long:
        raise InputError(f"--lengths: got {too_long}; expected at most {config.max_input_length:,}, the model's "
                         "maximum input length")
    make_out_dir(args.out)
    return lengths, batches, backends


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return answer_worker(args.worker, ForwardSpec, _worker)
    lengths, batches, backends = _check_arguments(args)
    words = args.keep_float.strip()
    keep = () if words == "none" else tuple(part.strip() for part in words.split(",") if part.strip())
    Quantization("int8", keep)  # checked before any work
    with tempfile.TemporaryDirectory(prefix="reformer-rt-bench-") as tmp:
        checkpoint = args.model or Path(tmp) / "model"
        if args.model is None:
            import torch

            torch.manual_seed(0)
            ReformerLM(ARCHITECTURES[args.arch]).save_pretrained(checkpoint)
        cache = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(Path(tmp) / "cache")  # the workers inherit it: they open what is made here
        try:
            exports = _prepare_exports(Path(checkpoint), backends, keep)
            specs = [ForwardSpec(b, batch, length, args.repeat, args.threads, args.profile, str(checkpoint),
                                 exports.get(b), keep)
                     for batch in batches for length in lengths
                     for b in (["hf"] if args.hf and has_transformers() else []) + backends]
            points = measure_in_workers(COMMAND, specs, args.quiet)
        finally:
            if cache is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = cache
    return _report(args, points)


def _prepare_exports(checkpoint: Path, backends: list[str], keep: tuple[str, ...]) -> dict[str, str]:
    """The cache entries the ONNX Runtime points open, made before any timing: the portable export per
    quantization and (float) the piece graphs of streamed rows."""
    exports = {}
    for backend in ("onnxruntime", "onnxruntime" + INT8):
        if backend in backends:
            quantization = Quantization("int8", keep) if backend.endswith(INT8) else None
            exports[backend] = str(cached_export(checkpoint, quantization=quantization))
    if "onnxruntime" in backends:
        from reformer_rt.export import load_source

        cached_pieces(load_source(checkpoint))
    return exports


def _report(args: argparse.Namespace, points: list[Point]) -> int:
    """bench.json and bench.png as one set; the table, the scaling and the profiles; the exit code."""
    provenance = Provenance.here()
    report = {**dataclasses.asdict(provenance), "model": str(args.model or f"random {args.arch} architecture"),
              "rows": [p.to_json() for p in points], "time_ratio_longest_to_shortest": scaling(points),
              "int8_keep_float": args.keep_float,
              "int8_vs_fp32": [{"backend": impl, "batch": batch, "length": length, "time_ratio": ratios[0],
                                "memory_ratio": ratios[1]}
                               for (impl, batch, length), ratios in int8_ratios(points).items()]}
    files: dict[Path, bytes] = {args.out / "bench.json": json_bytes(report)}
    ran = any(p.seconds is not None for p in points)
    image = line_plot([Panel(_batch1(points), "sequence length (tokens)", "forward time (s), batch 1"),
                       Panel(_batch1(points, gigabytes=True), "sequence length (tokens)", "peak memory (GB), batch 1")],
                      f"reformer-rt bench on {provenance.machine}", size=(11, 4.5)) if ran else None
    if image is not None:
        files[args.out / "bench.png"] = image
    write_files_atomic(files, label="--out")
    print(f"machine: {provenance.machine}, {provenance.date}\n\n{table(points)}\n")
    print(f"time ratio longest/shortest length: {json.dumps(scaling(points))}")
    for p in points:
        if "profile" in p.details:
            ops = ", ".join(f"{op} {seconds:.2f}" for op, seconds in p.details["profile"].items())
            print(f"profile {p.impl} batch {p.batch} length {p.length:,} (s per operator type): {ops}")
    print(f"wrote {' and '.join(str(f) for f in files)}" + (" (pip install matplotlib for the plot)"
                                                              if ran and image is None else ""))
    return check_failures(points, args.out / "bench.json", COMMAND)
