"""What every benchmark shares, so that each bench module holds only what it measures and its arguments.

* ``Point``: one measured point -- what was measured, by which implementation, at which batch and length; its
  median time and peak memory, or the error that stopped it. Each bench fills points; the JSON, the tables, the
  plots and the exit code read them.
* ``measure_in_workers`` / ``answer_worker``: each point measured in a fresh process (``reformer-rt BENCH --worker
  SPEC``: the spec as JSON in, the point as JSON out, the last line of stdout), so that its peak memory and its
  caches are its own. A worker that fails gives its point an error -- the last line of its stderr -- and its exit
  code: 2 is a user error (a length over the model's maximum, a backend that is not installed), anything else an
  internal one; one that runs past ``WORKER_TIMEOUT_S`` is stopped.
* ``peak_memory``: this process's peak -- its resident-set high-water mark on CPU, ``max_memory_allocated`` on GPU.
* ``Provenance``: the machine, the date, Python and the library versions, written next to every figure.
* ``make_out_dir`` (``--out`` checked before any work), ``parse_ints``, ``check_failures`` (failed points -> the
  exit code: 2 when every failure is a user error, else 1).
* ``markdown_table`` and ``line_plot`` (matplotlib, imported only to draw; without it there is no plot).

Light to import: the command line loads this module at start-up, so numpy, torch and matplotlib are imported inside
the functions that use them.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import io
import json
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from reformer_rt.models import InputError
from reformer_rt.models.errors import os_error_hint

from ..hardware import machine_name

WORKER_TIMEOUT_S = 1800
#: Libraries whose versions every report records (those installed).
LIBRARIES = ("torch", "onnxruntime", "transformers", "triton", "tensorrt")
RSS_MEMORY, CUDA_MEMORY = "peak_rss_vmhwm", "cuda_max_allocated"


@dataclasses.dataclass(frozen=True)
class Point:
    """One point of a bench: measured (``seconds``, ``peak_bytes``) or failed (``error``)."""

    what: str  # what was measured: "forward", a model's name, "LSH layer", ...
    impl: str  # by which implementation: a backend, a decoding variant, "ours (op)", ...
    length: int  # tokens per sequence
    batch: int = 1
    seconds: float | None = None  # the median of the timed runs
    peak_bytes: int | None = None
    memory: str | None = None  # how peak_bytes was measured: RSS_MEMORY or CUDA_MEMORY
    error: str | None = None
    exit_code: int | None = None  # of the worker that failed (2: a user error); None when none ran or it timed out
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # the bench's own figures, JSON values

    @property
    def ms(self) -> float | None:
        return None if self.seconds is None else self.seconds * 1e3

    @property
    def label(self) -> str:
        return f"{self.what} {self.impl}, batch {self.batch}, length {self.length}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Point:
        return cls(**data)

    def failed(self, error: str, exit_code: int | None = None) -> Point:
        return dataclasses.replace(self, error=error, exit_code=exit_code)


def error_text(exc: BaseException) -> str:
    """An exception as a point's error: its type and message, cut to one short line's worth."""
    return f"{type(exc).__name__}: {exc}"[:300]


# ---------------------------------------------------------------------------------------------------- workers
class WorkerSpec(Protocol):
    """What a worker measures: a dataclass of JSON values that names the point it fills."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def pending(self) -> Point: ...


Spec = TypeVar("Spec", bound=WorkerSpec)


def measure_in_worker(command: str, spec: WorkerSpec, timeout_s: float = WORKER_TIMEOUT_S) -> Point:
    """``spec`` measured by ``reformer-rt COMMAND --worker SPEC`` in a fresh process, or its pending point with the
    worker's error (without the CLI's ``reformer-rt COMMAND: error:`` prefix) and exit code."""
    argv = [sys.executable, "-m", "reformer_rt.runtime.commands.cli", *command.split(), "--worker",
            json.dumps(dataclasses.asdict(spec))]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return spec.pending().failed(f"timed out after {timeout_s:g} s")
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return spec.pending().failed(tail.removeprefix(f"reformer-rt {command}: error: "), done.returncode)
    return Point.from_json(json.loads(done.stdout.strip().splitlines()[-1]))


def measure_in_workers(command: str, specs: Iterable[WorkerSpec], quiet: bool) -> list[Point]:
    """Each spec in its own worker, one after another (a line of JSON per point on stderr unless ``quiet``)."""
    points = []
    for spec in specs:
        points.append(measure_in_worker(command, spec))
        if not quiet:
            print(json.dumps(points[-1].to_json()), file=sys.stderr, flush=True)
    return points


def answer_worker(text: str, spec_type: type[Spec], measure: Callable[[Spec], Point]) -> int:
    """The worker's side: measure the spec ``text`` holds and print the point as the last line of stdout."""
    print(json.dumps(measure(spec_type(**json.loads(text))).to_json()))
    return 0


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark. (``ru_maxrss`` would include the parent's: Linux keeps it
    across fork + exec, and the parent may have exported a model.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(cuda: bool) -> tuple[int, str]:
    """(bytes, how measured): the CUDA allocator's peak when the work ran there, else this process's peak RSS."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated(), CUDA_MEMORY
    return peak_rss_bytes(), RSS_MEMORY


# ----------------------------------------------------------------------------------------------------- reports
@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where and with what the figures were measured: every report starts with it."""

    machine: str  # the GPU torch sees, else the CPU (``hardware.machine_name``)
    date: str
    python: str
    versions: dict[str, str]

    @classmethod
    def here(cls) -> Provenance:
        return cls(machine_name(), timestamp(), platform.python_version(), versions())


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def versions() -> dict[str, str]:
    """The installed versions of ``LIBRARIES``, and the CUDA torch was built for (when it was)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch
    except ImportError:
        return out
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def has_transformers() -> bool:
    """Whether the HF baseline can run here."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def parse_ints(text: str, name: str) -> list[int]:
    """``--name 1,4,16``: positive integers, or one clear error."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InputError(f"{name}: got {text!r}; expected comma-separated integers") from exc
    if not values or min(values) < 1:
        raise InputError(f"{name}: got {text!r}; expected positive integers")
    return values


def make_out_dir(out: Path) -> None:
    """``--out``: a directory, made if missing, or one clear error -- checked before any work."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} is a file; expected a directory (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create the directory {out} ({os_error_hint(exc)})") from exc


def check_failures(points: Sequence[Point], report: Path, command: str) -> int:
    """0 when every point ran; else the reason, as an ``InputError`` (exit 2) when every failure is a user error
    (its worker exited 2), else printed in the CLI's format with exit code 1."""
    failed = [p for p in points if p.error is not None]
    if not failed:
        return 0
    message = (f"{len(failed)} of {len(points)} points failed (first: {failed[0].label}: {failed[0].error}); "
               f"{report} records each")
    if all(p.exit_code == 2 for p in failed):
        raise InputError(message)
    print(f"reformer-rt {command}: error: {message}", file=sys.stderr)
    return 1


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: the header, its rule, one line per row (cells as ``str`` gives them)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One set of axes of a ``line_plot``: a line per series, through its (x, y) points in order."""

    series: Mapping[str, Sequence[tuple[float, float]]]
    xlabel: str
    ylabel: str
    title: str = ""
    yscale: str = "log"  # x is always on a log scale: lengths and client counts grow geometrically


def line_plot(panels: Sequence[Panel], title: str, size: tuple[float, float] = (7, 4.5)) -> bytes | None:
    """The PNG of ``panels`` side by side under ``title``, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, points in panel.series.items():
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale=panel.yscale, xlabel=panel.xlabel, ylabel=panel.ylabel, title=panel.title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    return image.getvalue()
