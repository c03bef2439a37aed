"""TensorRT engines from plugin-form ONNX exports: version checks, build progress, and the build itself.

``engine_for(onnx, BuildOptions(profile=...), cache)`` returns a serialized engine and its record, building it only
when the cache (``engine_cache.py``) has no valid entry; profiles are in ``engine_profiles.py``.

The build: import the LSH plugin module (its creator must be registered before the ONNX parser runs), parse the
file, one optimization profile for ``input_ids`` / ``attention_mask`` (B x L min/opt/max), a strongly typed network
(flag on 10.x, the only mode on 11.x), an optional workspace limit, an optional timing cache file (loaded, then
saved), TF32 on unless disabled, and tqdm bars fed by a ``trt.IProgressMonitor``.

Everything above the "TensorRT" section is plain Python and imports no TensorRT.

Known limits: one profile per engine; engines are tied to the TensorRT version and GPU architecture they were built
with (no version- or hardware-compatible builds: the Python plugin is not serializable into such engines); whether
TensorRT's timing cache covers plugin timings is unconfirmed. References: TensorRT Python API (``Builder``,
``OnnxParser``, ``IBuilderConfig``, ``IProgressMonitor``, ``ITimingCache``).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from reformer_rt.export.metadata import GRAPH_INPUTS, export_metadata
from reformer_rt.models import ReformerError
from reformer_rt.models.lsh import TENSORRT_INSTALL_HINT, TENSORRT_MIN_VERSION

from .artifacts import onnx_sha256, write_atomic
from .engine_cache import EngineCache, EngineKey, make_record
from .engine_profiles import Profile
from .errors import BackendUnavailable
from .hardware import GpuInfo, gpu_info

if TYPE_CHECKING:  # the TensorRT-calling functions below import it themselves, after import_tensorrt()
    import tensorrt as trt

PLUGIN_MODULE = "reformer_rt.plugins.tensorrt_plugin"


class EngineBuildError(ReformerError):
    """TensorRT could not parse or build the model; the message carries TensorRT's reasons."""


# ----------------------------------------------------------------------------------------------- versions
def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_tensorrt_version(version: str) -> None:
    if parse_version(version)[:2] < TENSORRT_MIN_VERSION:
        raise BackendUnavailable(f"TensorRT {version} is installed; reformer-rt needs >= "
                                 f"{'.'.join(map(str, TENSORRT_MIN_VERSION))}: {TENSORRT_INSTALL_HINT}")


def strong_typing_flags(version: str, available: Collection[str]) -> tuple[str, ...]:
    """Network creation flags for a strongly typed network: STRONGLY_TYPED on 10.x; none on 11.x (the default)."""
    if parse_version(version)[:1] >= (11,):
        return ()
    if "STRONGLY_TYPED" not in available:
        raise BackendUnavailable(f"TensorRT {version} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED; "
                                 f"{TENSORRT_INSTALL_HINT}")
    return ("STRONGLY_TYPED",)


# ------------------------------------------------------------------------------------------------ progress
class PhaseBars:
    """tqdm bars for TensorRT's nested build phases; thread-safe (TensorRT calls from its build threads)."""

    def __init__(self, enabled: bool | None = None, file: Any = None) -> None:
        self.enabled, self.file = enabled, file
        self.cancelled = False
        self._bars: dict[str, tqdm] = {}
        self._depth: dict[str, int] = {}
        self._lock = threading.Lock()

    def start(self, phase: str, parent: str | None, steps: int) -> None:
        with self._lock:
            depth = self._depth.get(parent, -1) + 1 if parent else 0
            self._depth[phase] = depth
            disable = None if self.enabled is None else not self.enabled  # None: tqdm shows bars on a terminal
            self._bars[phase] = tqdm(total=steps, desc=phase, position=depth, leave=depth == 0, unit="step",
                                     disable=disable, file=self.file)

    def step(self, phase: str, step: int) -> bool:
        """Record progress; False asks TensorRT to cancel the build."""
        with self._lock:
            bar = self._bars.get(phase)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return not self.cancelled

    def finish(self, phase: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase, None)
            self._depth.pop(phase, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        for phase in list(self._bars):
            self.finish(phase)


# ------------------------------------------------------------------------------------------------- TensorRT
def import_tensorrt() -> ModuleType:
    """The TensorRT module, checked; ``BackendUnavailable`` saying what to install otherwise."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({exc}): {TENSORRT_INSTALL_HINT}") from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        where = getattr(trt, "__file__", None) or list(getattr(trt, "__path__", []))
        raise BackendUnavailable(f"'tensorrt' at {where} is not the TensorRT library (type stubs alone, such as "
                                 "the tensorrt-stubs package, install an empty 'tensorrt' package): "
                                 f"{TENSORRT_INSTALL_HINT}")
    check_tensorrt_version(trt.__version__)
    return trt


def import_plugin() -> ModuleType:
    """The LSH plugin module (registers its creator); ``BackendUnavailable`` if its dependencies are missing."""
    try:
        return importlib.import_module(PLUGIN_MODULE)
    except ImportError as exc:
        raise BackendUnavailable(f"the LSHAttention TensorRT plugin cannot load: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    profile: Profile
    workspace_mib: int | None = None
    timing_cache: Path | None = None
    tf32: bool = True
    progress: bool | None = None  # None: bars only on a terminal


@dataclasses.dataclass(frozen=True)
class BuiltEngine:
    engine: bytes
    record: dict[str, Any]
    cache_hit: bool
    seconds: float


def engine_for(onnx_path: Path, options: BuildOptions, cache: EngineCache | None, device: str = "cuda",
               log: Callable[[str], None] = print) -> BuiltEngine:
    """The engine for ``onnx_path`` under ``options``: from ``cache`` when a valid entry exists, else built."""
    start = time.perf_counter()
    metadata = export_metadata(onnx_path, attention="plugin")
    trt = import_tensorrt()
    gpu = gpu_info(device)
    key = EngineKey(onnx_sha256(onnx_path), trt.__version__, gpu.name, gpu.compute_capability, options.profile,
                    options.workspace_mib, options.tf32)
    found = cache.load(key, log) if cache is not None else None
    if found is not None:
        return BuiltEngine(found.engine, found.record, True, time.perf_counter() - start)
    engine = build_serialized(onnx_path, options, gpu, log)
    record = make_record(key, engine, metadata, onnx_path.absolute())
    if cache is not None:
        try:
            cache.store(key, engine, record)
        except OSError as exc:  # a read-only or full cache directory costs a rebuild next time, nothing more
            log(f"engine cache: could not store the engine under {cache.root} ({exc})")
    return BuiltEngine(engine, record, False, time.perf_counter() - start)


def build_serialized(onnx_path: Path, options: BuildOptions, gpu: GpuInfo,
                     log: Callable[[str], None] = print) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (see the module docstring)."""
    import_tensorrt()
    import tensorrt as trt
    import torch

    import_plugin()  # the parser looks the plugin creator up while parsing
    torch.cuda.set_device(gpu.index)  # torch (plugin) and TensorRT must share the device's primary context
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = strong_typing_flags(trt.__version__, trt.NetworkDefinitionCreationFlag.__members__)
    network = builder.create_network(sum(1 << int(getattr(trt.NetworkDefinitionCreationFlag, f)) for f in flags))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    _configure(builder, network, config, options)
    _load_timing_cache(config, options.timing_cache, log)
    bars = PhaseBars(options.progress)
    config.progress_monitor = _progress_monitor(bars)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        bars.close()
    if bars.cancelled:
        raise KeyboardInterrupt
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine (its log above says why)")
    if options.timing_cache is not None:
        write_atomic(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _configure(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig,
               options: BuildOptions) -> None:
    import tensorrt as trt

    names = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if names != sorted(GRAPH_INPUTS):
        raise EngineBuildError(f"ONNX inputs {names}; expected {sorted(GRAPH_INPUTS)} (a reformer-rt export)")
    profile = builder.create_optimization_profile()
    low, opt, high = (trt.Dims(list(shape)) for shape in (options.profile.min, options.profile.opt,
                                                           options.profile.max))
    for name in GRAPH_INPUTS:
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None, log: Callable[[str], None]) -> None:
    if path is None:
        return
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"timing cache {path}: unusable here (another TensorRT version or GPU); starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _progress_monitor(bars: PhaseBars) -> trt.IProgressMonitor:
    """A ``trt.IProgressMonitor`` forwarding to ``bars``; Ctrl-C during the build cancels it cleanly."""
    import tensorrt as trt

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            bars.start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                return bars.step(phase_name, step)
            except KeyboardInterrupt:
                bars.cancelled = True
                return False

        def phase_finish(self, phase_name: str) -> None:
            bars.finish(phase_name)

    return _Monitor()
