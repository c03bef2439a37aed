"""What this machine is: the CUDA device a backend runs on, and a one-line machine name for reports.

``gpu_info`` is the one place that turns a device string into a checked GPU (name, compute capability, index);
``machine_name`` is what every benchmark and report prints next to its numbers.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

from .errors import BackendUnavailable


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    index: int


def gpu_info(device: str = "cuda") -> GpuInfo:
    """The CUDA device ``device`` names ('cuda' = the current one), or ``BackendUnavailable`` saying why not."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError as exc:
        raise BackendUnavailable(f"device: got {device!r}; expected 'cuda' or 'cuda:N'") from exc
    if where.type != "cuda":
        raise BackendUnavailable(f"device: got {device!r}; expected a CUDA device ('cuda' or 'cuda:N')")
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"no CUDA GPU: torch {torch.__version__} sees none (a CPU-only torch build, no "
                                 "driver, or CUDA_VISIBLE_DEVICES empty)")
    index = torch.cuda.current_device() if where.index is None else where.index
    if index >= torch.cuda.device_count():
        raise BackendUnavailable(f"device: got {device!r}; this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(torch.cuda.get_device_name(index), f"{major}.{minor}", index)


def cpu_name() -> str:
    """The CPU model and core count, e.g. 'Intel(R) Xeon(R) ..., 2 cores'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def machine_name() -> str:
    """The GPU's name when torch sees one, else the CPU's: what a benchmark figure ran on."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()


def resolve_device(device: str | None) -> str:
    """``device`` checked ('cpu', 'cuda' or 'cuda:N'); None means 'cuda' when torch sees a GPU, else 'cpu'."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise BackendUnavailable(f"device: got {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from exc
    if kind not in ("cpu", "cuda"):
        raise BackendUnavailable(f"device: got {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    if kind == "cuda":
        gpu_info(device)  # raises when there is no such GPU
    return device
