"""``make gpu-check OUT=DIR``: prove and time the whole CUDA path on one GPU machine, in one command.

Runs on a machine as it is -- preinstalled torch (CUDA build), triton, transformers, pytest; no package index,
nothing installed: run as a file (``python3 tools/gpu_check.py --out DIR``, what ``make gpu-check`` does), it
links the checkout's packages under ``build/import-path/reformer_rt/`` (the package-dir mapping of
pyproject.toml) and puts that first on its own import path and on ``PYTHONPATH``; every step inherits the path.
A development tool of this repository, not part of the installed package. Steps, each in its own process with its
own timeout, all within one wall-time budget (``--budget``, default 480 s; a hung step is killed with its process
group and the next one runs):

==========  =============================================================================================
doctor      ``reformer-rt doctor``: versions, providers, Triton self-test (fp32, fp16), tiny-model CUDA forward
gpu-tests   ``pytest tests/gpu -m gpu``: compiled kernels, model and Session on CUDA (a skip fails the step)
session     the demo model through ``Session`` on CUDA vs the CPU reference, bucket by bucket (``tools/gpu_session.py``)
headline    crime-and-punishment architecture, 524,288 tokens: Session, fp16 model, HF eager (``gpu_session.py``)
bench       ``python -m reformer_rt.runtime.bench.gpu --profile``: parity at 4K-64K, layer and model timings
==========  =============================================================================================

Writes under DIR (8 files): ``gpu_check.log`` (every step's output), ``gpu_check.json`` (steps, wall times,
figures, targets), ``gpu_check.md`` (the summary), ``tests.xml`` (JUnit), ``session.json``, ``headline.json``,
``bench/bench.json`` and ``bench/bench.md``; prints each step's output as it runs and the summary last.
Performance targets are reported as met or missed; they do not fail the check. Exit status: 0 every step passed,
1 a step failed or ran out of time, 2 no CUDA GPU (said within seconds, nothing run).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO
from xml.etree import ElementTree

#: Whole-check wall time (s) for an H100; every step's timeout is cut to what is left of it.
DEFAULT_BUDGET_S = 480
TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    estimate_s: int  # on an H100, for the budget; kernels compiled by an earlier step are cached
    judge: Callable[[int, str, Path], tuple[bool, str]]  # (exit code, output tail, DIR) -> (passed, one line)


@dataclasses.dataclass(frozen=True)
class StepResult:
    name: str
    status: str  # "passed", "FAILED", "TIMED OUT" or "not run"
    seconds: float
    timeout_s: float
    summary: str


def _last_line(output: str, prefix: str) -> str:
    return next((line for line in reversed(output.splitlines()) if line.startswith(prefix)), "")


def _judge_by_exit(prefix: str) -> Callable[[int, str, Path], tuple[bool, str]]:
    def judge(code: int, output: str, out: Path) -> tuple[bool, str]:
        return code == 0, _last_line(output, prefix) or f"exit code {code}"
    return judge


def _judge_tests(code: int, output: str, out: Path) -> tuple[bool, str]:
    """pytest's verdict from the JUnit file; a skip fails: on the machine it exists for, it proves nothing."""
    try:
        suite = ElementTree.parse(out / "tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except (OSError, ElementTree.ParseError, AttributeError) as exc:
        return False, f"exit code {code}; no readable tests.xml ({exc})"
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    line = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
            f"of {counts['tests']}")
    return code == 0 and counts["skipped"] == 0 and passed > 0, line


def _judge_bench(code: int, output: str, out: Path) -> tuple[bool, str]:
    try:
        report = json.loads((out / "bench" / "bench.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return False, f"exit code {code}; no readable bench.json ({exc})"
    parity = report.get("parity", [])
    targets = report.get("targets", [])
    ok = sum(p["ok"] for p in parity)
    return code == 0, (f"parity {ok} of {len(parity)} ok; targets met {sum(t['met'] for t in targets)} of "
                       f"{len(targets)}")


def steps(out: Path) -> list[Step]:
    python = sys.executable
    return [
        Step("doctor", [python, "-m", "reformer_rt.runtime.commands.cli", "doctor"], 150, 30,
             _judge_by_exit("doctor:")),
        Step("gpu-tests", [python, "-m", "pytest", str(REPO / "tests" / "gpu"), "-m", "gpu", "-q", "-p",
                           "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"], 240, 110, _judge_tests),
        Step("session", [python, str(TOOLS / "gpu_session.py"), "parity", "--out", str(out / "session.json")], 150, 45,
             _judge_by_exit("session parity:")),
        Step("headline", [python, str(TOOLS / "gpu_session.py"), "headline", "--out", str(out / "headline.json")], 150,
             40, _judge_by_exit("headline:")),
        Step("bench", [python, "-m", "reformer_rt.runtime.bench.gpu", "--profile", "--out", str(out / "bench")],
             330, 180, _judge_bench),
    ]


def run_step(step: Step, timeout_s: float, env: dict[str, str], log: TextIO, out: Path) -> StepResult:
    """Run one step in its own process group, streaming its output to the console and the log."""
    banner = f"\n===== {step.name}: {' '.join(step.argv)} (timeout {timeout_s:.0f} s)\n"
    for stream in (sys.stdout, log):
        stream.write(banner)
        stream.flush()
    tail: collections.deque[str] = collections.deque(maxlen=400)
    started = time.monotonic()
    process = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=REPO, start_new_session=True, errors="replace")

    def pump() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            tail.append(line)
            for stream in (sys.stdout, log):
                stream.write(line)
                stream.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(timeout=10)
        return StepResult(step.name, "TIMED OUT", time.monotonic() - started, timeout_s,
                          f"killed after {timeout_s:.0f} s")
    reader.join(timeout=10)
    passed, summary = step.judge(code, "".join(tail), out)
    return StepResult(step.name, "passed" if passed else "FAILED", time.monotonic() - started, timeout_s, summary)


def _environment() -> dict[str, str]:
    """The steps' environment: this one (import path included), unbuffered, without Triton's interpreter (it would
    stop every kernel from compiling)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _targets(out: Path) -> list[dict]:
    found = []
    for name in ("bench/bench.json", "headline.json"):
        try:
            found += json.loads((out / name).read_text()).get("targets", [])
        except (OSError, json.JSONDecodeError):
            continue
    return found


def summary(results: Sequence[StepResult], targets: Sequence[dict], device: str, seconds: float) -> str:
    from reformer_rt.runtime.bench.gpu_report import Target, format_targets
    from reformer_rt.runtime.bench.harness import markdown_table, timestamp

    estimates = {s.name: s.estimate_s for s in steps(Path())}
    lines = [f"gpu-check on {device}, {timestamp()}", "", markdown_table(
        ("step", "status", "wall s", "H100 estimate s", "timeout s", "result"),
        [(r.name, r.status, f"{r.seconds:.0f}", estimates[r.name], f"{r.timeout_s:.0f}", r.summary) for r in results])]
    if targets:
        fields = ("what", "measured", "limit", "unit")
        lines += ["", format_targets([Target(**{k: t[k] for k in fields}) for t in targets])]
    failed = [r.name for r in results if r.status != "passed"]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "PASSED"
    lines += ["", f"gpu-check: {verdict} ({len(results) - len(failed)} of {len(results)} steps) in {seconds:.0f} s"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-check OUT=DIR", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the log, reports and summary")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="wall-time budget in seconds")
    parser.add_argument("--steps", help="comma-separated subset to run (a rerun), e.g. session,bench")
    args = parser.parse_args(argv)
    missing = cuda_missing()
    if missing:
        print(f"gpu-check: {missing}; this check needs an NVIDIA GPU and a CUDA build of torch. Nothing was run.",
              file=sys.stderr)
        return 2
    import torch

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = steps(out)
    if args.steps:
        names = [n.strip() for n in args.steps.split(",") if n.strip()]
        unknown = sorted(set(names) - {s.name for s in chosen})
        if unknown:
            parser.error(f"--steps: got {unknown}; expected names from {[s.name for s in chosen]}")
        chosen = [s for s in chosen if s.name in names]
    device = torch.cuda.get_device_name()
    started = time.monotonic()
    results = []
    with open(out / "gpu_check.log", "w", encoding="utf-8") as log:
        log.write(f"gpu-check on {device}; python {platform.python_version()} {sys.executable}; torch "
                  f"{torch.__version__}; code from {REPO}\n")
        for step in chosen:
            left = args.budget - (time.monotonic() - started)
            if left < 10:
                results.append(StepResult(step.name, "not run", 0.0, 0.0, "no time left in the budget"))
                continue
            results.append(run_step(step, min(step.timeout_s, left), _environment(), log, out))
    seconds = time.monotonic() - started
    targets = _targets(out)
    text = summary(results, targets, device, seconds)
    report = {"device": device, "python": platform.python_version(), "torch": torch.__version__, "code": str(REPO),
              "budget_s": args.budget, "seconds": seconds, "steps": [dataclasses.asdict(r) for r in results],
              "targets": targets}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(text + "\n", encoding="utf-8")
    print("\n" + text)
    return 0 if all(r.status == "passed" for r in results) else 1


def cuda_missing() -> str | None:
    """Why this interpreter cannot run the check (no torch, or no CUDA GPU visible to it), or None."""
    try:
        import torch
    except ImportError as exc:
        return f"{sys.executable} cannot import torch ({exc})"
    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"
    return None


def import_path() -> Path:
    """``build/import-path/reformer_rt/<package>`` linked to each top-level package folder of the checkout (the
    package-dir mapping of pyproject.toml): on ``PYTHONPATH`` it makes ``import reformer_rt`` this working tree."""
    root = REPO / "build" / "import-path"
    (root / "reformer_rt").mkdir(parents=True, exist_ok=True)
    for init in sorted(REPO.glob("*/__init__.py")):
        link = root / "reformer_rt" / init.parent.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(init.parent, target_is_directory=True)
    return root


if __name__ == "__main__":
    if not cuda_missing():  # else main() says why and exits 2 before anything is linked or imported
        linked = str(import_path())
        sys.path.insert(0, linked)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (linked, os.environ.get("PYTHONPATH")) if p)
    sys.exit(main())
