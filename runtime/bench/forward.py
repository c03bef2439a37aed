"""``reformer-rt bench``: latency, throughput and peak memory vs length and batch, every backend side by side.

Each (backend, batch, length) point runs in a fresh worker process, so its peak memory (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is its own; the baseline -- HF transformers eager on the same
weights, when transformers is installed -- runs in the same invocation, the same way. Timings are the median
of ``--repeat`` runs after one warm-up run. Without a MODEL argument the model is ``--arch`` with random weights:
``crime-and-punishment`` (6 layers local/LSH, d=256, 2 heads x 128, 1 hash round, chunk 64, axial 512 x 1024) or
``enwik8-like`` (6 layers local/LSH, d=512, 8 heads x 64, 4 hash rounds, chunk 128, buckets 32 x 32).
``--profile`` adds, for each ONNX Runtime point, one profiled run and its time per operator type.

Writes ``bench.json`` and ``bench.png`` (matplotlib) into ``--out`` (together, atomically) and prints a markdown
table with the machine. ONNX Runtime points use a portable export made once before timing (export time is not
counted). Arguments, the model and ``--out`` are checked before any work. A point that fails is recorded with its
error and the command exits non-zero: 2 when every failure is a user error (a length over the model's maximum, a
backend that is not installed), else 1.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from reformer_rt.models import InputError, ReformerConfig, ReformerLM
from reformer_rt.models.checkpoint import CONFIG_FILE
from reformer_rt.models.errors import os_error_hint
from reformer_rt.models.presets import ARCHITECTURES

from ..artifacts import write_files_atomic
from ..hardware import machine_name

if TYPE_CHECKING:  # numpy is imported where the work is, not at CLI start-up
    import numpy as np

PROFILE_TOP = 12  # operator types listed per profiled point
WORKER_TIMEOUT_S = 1800
#: How a worker's failure starts when it is a user error (the CLI's one-line format); stripped in the report.
USER_ERROR_PREFIX = "reformer-rt bench: error: "


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="latency / throughput / peak memory per backend, with the HF baseline "
                              "(reformer-rt bench serve: load a server)", description=__doc__.split("\n\n")[0],
                              epilog="reformer-rt bench serve --help: the concurrency sweep against a KServe v2 server")
    p.add_argument("model", nargs="?", type=Path, help="checkpoint directory (default: --arch with random weights)")
    p.add_argument("--arch", default="crime-and-punishment", help=f"without MODEL: {' or '.join(ARCHITECTURES)}")
    p.add_argument("--lengths", default="16384,65536", help="comma-separated sequence lengths")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime, tensorrt")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every backend (default: all)")
    p.add_argument("--profile", action="store_true", help="ONNX Runtime points: one more run, profiled; time per "
                   "operator type")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InputError(f"{name}: got {text!r}; expected comma-separated integers") from exc
    if not values or min(values) < 1:
        raise InputError(f"{name}: got {text!r}; expected positive integers")
    return values


# ----------------------------------------------------------------------------------------------------- worker
def _worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: load, warm up, time ``repeat`` runs."""
    import numpy as np
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    rng = np.random.default_rng(0)
    config = ReformerConfig.from_json_file(Path(spec["checkpoint"]) / "config.json")
    ids = rng.integers(0, config.vocab_size, (spec["batch"], spec["length"]), dtype=np.int64)
    cuda = torch.cuda.is_available()
    if spec["backend"] == "hf":
        import transformers

        model = transformers.ReformerModelWithLMHead.from_pretrained(spec["checkpoint"]).eval()
        model = model.cuda() if cuda else model
        tensor = torch.from_numpy(ids).to("cuda" if cuda else "cpu")

        def step() -> None:
            with torch.inference_mode():
                model(tensor)
    else:
        from ..session import Session

        path = spec.get("onnx") or spec["checkpoint"]
        session = Session(path, backend=spec["backend"], threads=spec["threads"],
                          max_tokens_per_batch=spec["batch"] * spec["length"])

        def step() -> None:
            session.run(ids)

    times = []
    for i in range(spec["repeat"] + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    median = statistics.median(times)
    point = {"backend": spec["backend"], "batch": spec["batch"], "length": spec["length"], "seconds": median,
             "tokens_per_s": spec["batch"] * spec["length"] / median, "peak_gb": peak / 1e9,
             "memory": "cuda_max_allocated" if cuda else "peak_rss_vmhwm"}
    if spec.get("profile") and spec["backend"] == "onnxruntime":
        point["profile"] = _profile(path, ids, spec["threads"])
    return point


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


def _peak_rss_bytes() -> int:
    """This process's resident-set high-water mark. (``ru_maxrss`` would include the parent's: Linux keeps it
    across fork + exec, and the parent may have exported a model.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(spec: dict) -> dict:
    """One point in a fresh worker process: its measurement, or its error and the worker's exit code."""
    command = [sys.executable, "-m", "reformer_rt.runtime.bench.forward", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**_point(spec), "error": f"timed out after {WORKER_TIMEOUT_S} s", "exit_code": None}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**_point(spec), "error": tail.removeprefix(USER_ERROR_PREFIX), "exit_code": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _point(spec: dict) -> dict:
    return {"backend": spec["backend"], "batch": spec["batch"], "length": spec["length"]}


# ------------------------------------------------------------------------------------------------------ report
def table(rows: list[dict]) -> str:
    """Markdown table; ``vs HF`` is the time ratio to the transformers row of the same batch and length."""
    base = {(r["batch"], r["length"]): r["seconds"] for r in rows if r["backend"] == "hf" and "seconds" in r}
    lines = ["| backend | batch | length | time (s) | tokens/s | peak memory (GB) | vs HF |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['batch']} | {r['length']:,} | failed: {r['error']} | | | |")
            continue
        ref = base.get((r["batch"], r["length"]))
        ratio = f"{r['seconds'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['backend']} | {r['batch']} | {r['length']:,} | {r['seconds']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_gb']:.2f} | {ratio} |")
    return "\n".join(lines)


def scaling(rows: list[dict]) -> dict[str, float]:
    """time(longest)/time(shortest) per backend at batch 1 -- linear scaling gives the length ratio."""
    out = {}
    for backend in sorted({r["backend"] for r in rows}):
        points = sorted((r["length"], r["seconds"]) for r in rows
                        if r["backend"] == backend and r["batch"] == 1 and "seconds" in r)
        if len(points) >= 2:
            out[backend] = points[-1][1] / points[0][1]
    return out


def plot(rows: list[dict], title: str) -> bytes | None:
    """The PNG of time vs length per backend at batch 1, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r["backend"] for r in rows}):
        points = sorted((r["length"], r["seconds"]) for r in rows
                        if r["backend"] == backend and r["batch"] == 1 and "seconds" in r)
        if points:
            ax.plot(*zip(*points), marker="o", label=backend)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="forward time (s), batch 1",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    return image.getvalue()


def _check_arguments(args: argparse.Namespace) -> tuple[list[int], list[int], list[str]]:
    """(lengths, batches, backends), every argument checked before any work; creates ``--out``."""
    lengths, batches = parse_ints(args.lengths, "--lengths"), parse_ints(args.batches, "--batches")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"torch", "onnxruntime", "tensorrt"})
    if unknown or not backends:
        raise InputError(f"--backends: got {args.backends!r}; expected torch, onnxruntime and/or tensorrt")
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


def make_out_dir(out: Path) -> None:
    """``--out``: a directory, made if missing, or one clear error."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} is a file; expected a directory (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create the directory {out} ({os_error_hint(exc)})") from exc


def check_failures(rows: list[dict], report: Path, point: Callable[[dict], str], command: str = "bench") -> int:
    """0 when every point ran; else the reason (``point`` names a failed one), as an ``InputError`` when every
    failure is a user error (the worker exited 2)."""
    failed = [r for r in rows if "error" in r]
    if not failed:
        return 0
    message = (f"{len(failed)} of {len(rows)} points failed (first: {point(failed[0])}: {failed[0]['error']}); "
               f"{report} records each")
    if all(r.get("exit_code") == 2 for r in failed):
        raise InputError(message)
    print(f"reformer-rt {command}: error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    lengths, batches, backends = _check_arguments(args)
    with tempfile.TemporaryDirectory(prefix="reformer-rt-bench-") as tmp:
        checkpoint = args.model or Path(tmp) / "model"
        if args.model is None:
            import torch

            torch.manual_seed(0)
            ReformerLM(ARCHITECTURES[args.arch]).save_pretrained(checkpoint)
        onnx_path = None
        if "onnxruntime" in backends:
            from reformer_rt.export import export_onnx

            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(checkpoint, onnx_path, attention="portable", validate=False, log=None)
        specs = [{"backend": b, "batch": batch, "length": length, "repeat": args.repeat, "threads": args.threads,
                  "profile": args.profile, "checkpoint": str(checkpoint),
                  "onnx": str(onnx_path) if b == "onnxruntime" else None}
                 for batch in batches for length in lengths
                 for b in (["hf"] if args.hf and _has_transformers() else []) + backends]
        rows = []
        for spec in specs:
            rows.append(_measure(spec))
            if not args.quiet:
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    name = machine_name()
    report = {"machine": name, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
              "versions": _versions(), "model": str(args.model or f"random {args.arch} architecture"),
              "rows": rows, "time_ratio_longest_to_shortest": scaling(rows)}
    files: dict[Path, bytes] = {args.out / "bench.json": (json.dumps(report, indent=2) + "\n").encode()}
    ran = any("seconds" in r for r in rows)
    image = plot(rows, f"reformer-rt bench on {name}") if ran else None
    if image is not None:
        files[args.out / "bench.png"] = image
    write_files_atomic(files, label="--out")
    print(f"machine: {name}, {report['date']}\n\n{table(rows)}\n")
    print(f"time ratio longest/shortest length: {json.dumps(scaling(rows))}")
    for r in rows:
        if "profile" in r:
            ops = ", ".join(f"{op} {seconds:.2f}" for op, seconds in r["profile"].items())
            print(f"profile {r['backend']} batch {r['batch']} length {r['length']:,} (s per operator type): {ops}")
    print(f"wrote {' and '.join(str(f) for f in files)}" + (" (pip install matplotlib for the plot)"
                                                              if ran and image is None else ""))
    return check_failures(rows, args.out / "bench.json",
                          lambda r: f"{r['backend']}, batch {r['batch']}, length {r['length']}")


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in ("torch", "onnxruntime", "transformers", "triton", "tensorrt"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    from ..commands.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
