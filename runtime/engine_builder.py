"""TensorRT engines from plugin-form ONNX exports: profiles, the build itself, and a verified engine cache.

``engine_for(onnx, BuildOptions(profile=...), cache)`` returns a serialized engine and its record (the ONNX file's
model config and export options, the cache key, the engine's sha256), building it only when the cache has no
valid entry. ``write_engine_file`` stores an engine with that record beside it (``MODEL.engine.json``) so that the
runtime can open an engine file alone; ``read_engine_file`` verifies the pair.

The build: import the LSH plugin module (its creator must be registered before the ONNX parser runs), parse the
file, one optimization profile for ``input_ids`` / ``attention_mask`` (B x L min/opt/max), a strongly typed network
(flag on 10.x, the only mode on 11.x), an optional workspace limit, an optional timing cache file (loaded, then
saved), TF32 on unless disabled, and tqdm bars fed by a ``trt.IProgressMonitor``.

The cache key is (ONNX sha256 incl. external data, TensorRT version, GPU name, compute capability, profile, workspace,
TF32, op id + version, ``ENGINE_FORMAT``): an engine built for another file, TensorRT, GPU or profile is never
loaded. An entry is a directory (engine + ``entry.json`` holding the key and the engine's sha256), renamed into
place complete; an entry whose key or hash does not check out is deleted and rebuilt.

Everything above the "TensorRT" section is plain Python (hashlib, json, tqdm) and imports no TensorRT.

Known limits: one profile per engine; engines are tied to the TensorRT version and GPU architecture they were built
with (no version- or hardware-compatible builds: the Python plugin is not serializable into such engines); whether
TensorRT's timing cache covers plugin timings is unconfirmed. References: TensorRT Python API (``Builder``,
``OnnxParser``, ``IBuilderConfig``, ``IProgressMonitor``, ``ITimingCache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from tqdm import tqdm

from reformer_rt.export.lowering import INPUT_NAMES
from reformer_rt.models import InputError, ReformerError
from reformer_rt.models.lsh import OP_ID, OP_VERSION

from .backends import BackendUnavailable
from .session import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:  # the TensorRT-calling functions below import it themselves, after import_tensorrt()
    import tensorrt as trt

ENGINE_FORMAT = 1  # bump when the build recipe or the record layout changes: old cache entries stop matching
MIN_TENSORRT = (10, 8)
PLUGIN_MODULE = "reformer_rt.plugins.tensorrt_plugin"
INSTALL_HINT = ('pip install "tensorrt-cu12>=10.8" (CUDA 12 driver) or "tensorrt-cu13>=10.13.2" (CUDA 13 driver), '
                "on a machine with an NVIDIA GPU")
ENGINE_FILE, ENTRY_FILE = "engine.plan", "entry.json"


class ProfileError(InputError):
    """A bad ``--min/--opt/--max`` shape."""


class EngineBuildError(ReformerError):
    """TensorRT could not parse or build the model; the message carries TensorRT's reasons."""


class EngineFileError(ReformerError):
    """An engine file that is missing, corrupt, unpaired with its record, or built for another machine."""


# ------------------------------------------------------------------------------------------------------ profiles
class BatchLength(NamedTuple):
    batch: int
    length: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.length}"


_BXL = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


def parse_batch_length(text: str, option: str) -> BatchLength:
    """``"4x8192"`` -> BatchLength(4, 8192); ``option`` names the flag in errors."""
    match = _BXL.fullmatch(text)
    if match is None:
        raise ProfileError(f"{option}: got {text!r}; expected BxL (batch x length in tokens), such as 4x8192")
    shape = BatchLength(int(match.group(1)), int(match.group(2)))
    if shape.batch < 1 or shape.length < 1:
        raise ProfileError(f"{option}: got {text!r}; expected batch >= 1 and length >= 1")
    return shape


@dataclasses.dataclass(frozen=True)
class Profile:
    """The one optimization profile of an engine: B x L bounds shared by ``input_ids`` and ``attention_mask``."""

    min: BatchLength
    opt: BatchLength
    max: BatchLength

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def __str__(self) -> str:
        return f"min {self.min}, opt {self.opt}, max {self.max}"


def make_profile(min_shape: BatchLength | None, opt_shape: BatchLength | None, max_shape: BatchLength | None,
                 max_length: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> Profile:
    """A checked profile; defaults: max = (max_tokens // max_length) x max_length, min = 1x1, opt = max."""
    maximum = max_shape or BatchLength(max(1, max_tokens // max_length), max_length)
    profile = Profile(min_shape or BatchLength(1, 1), opt_shape or maximum, maximum)
    if profile.max.length > max_length:
        raise ProfileError(f"--max: got length {profile.max.length}; expected at most {max_length}, the longest "
                           "input the ONNX file was exported for (re-export with a larger --max-length)")
    for name, low, high in (("--opt", profile.min, profile.opt), ("--max", profile.opt, profile.max)):
        if low.batch > high.batch or low.length > high.length:
            raise ProfileError(f"{name}: got {high}, below {low}; expected min <= opt <= max in both batch and "
                               f"length (profile {profile})")
    return profile


# ------------------------------------------------------------------------------------------- hashing and keys
def files_sha256(paths: Collection[Path]) -> str:
    """sha256 over the files' names and bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def onnx_sha256(path: Path) -> str:
    """sha256 of an ONNX file and every external-data file its tensors name (weights live there when > 2 GB)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)]
    locations = sorted({e.value for t in tensors for e in t.external_data if e.key == "location"})
    return files_sha256([path, *(path.parent / location for location in locations)])


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; ``digest`` names its cache entry."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: Profile
    workspace_mib: int | None = None
    tf32: bool = True
    op_id: str = OP_ID
    op_version: int = OP_VERSION
    engine_format: int = ENGINE_FORMAT

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "profile": self.profile.as_dict()}

    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- files and cache
def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory: all or nothing."""
    temporary: str | None = None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        temporary = None
    except OSError as exc:
        raise InputError(f"output: cannot write {path} ({exc.strerror or exc}); choose a writable directory "
                         "that exists") from exc
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def make_record(key: EngineKey, engine: bytes, metadata: dict[str, Any], source: Path) -> dict[str, Any]:
    """What is stored next to an engine: its key and hash, and the ONNX metadata the runtime needs."""
    return {"engine_format": ENGINE_FORMAT, "engine_sha256": hashlib.sha256(engine).hexdigest(),
            "engine_bytes": len(engine), "key": key.as_dict(), "source": str(source), "metadata": metadata}


def verify_record(engine: bytes, record: Any) -> str | None:
    """Why ``engine`` and ``record`` do not belong together (None when they do)."""
    if not isinstance(record, dict) or record.get("engine_format") != ENGINE_FORMAT:
        return f"record format is not {ENGINE_FORMAT}"
    if record.get("engine_bytes") != len(engine) or record.get("engine_sha256") != hashlib.sha256(engine).hexdigest():
        return "engine bytes do not match the sha256 in the record"
    if not isinstance(record.get("metadata"), dict) or "config" not in record["metadata"]:
        return "record has no model metadata"
    return None


class EngineCache:
    """Engines under ``root/<key digest>/``; entries appear complete (directory rename) or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: EngineKey) -> Path:
        return self.root / key.digest()[:32]

    def check(self, key: EngineKey) -> tuple[bytes, dict[str, Any]] | str:
        """The entry's (engine, record), or why it is unusable."""
        directory = self.entry_dir(key)
        try:
            engine = (directory / ENGINE_FILE).read_bytes()
            record = json.loads((directory / ENTRY_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "no entry"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"unreadable entry ({exc})"
        problem = verify_record(engine, record)
        if problem is None and record.get("key") != key.as_dict():
            problem = "entry was stored under another key"
        return problem or (engine, record)

    def load(self, key: EngineKey, log: Callable[[str], None] = print) -> tuple[bytes, dict[str, Any]] | None:
        """A verified entry, or None; a corrupt entry is deleted (so the caller rebuilds it)."""
        found = self.check(key)
        if isinstance(found, tuple):
            return found
        if found != "no entry":
            log(f"engine cache: discarding {self.entry_dir(key)}: {found}")
            shutil.rmtree(self.entry_dir(key), ignore_errors=True)
        return None

    def store(self, key: EngineKey, engine: bytes, record: dict[str, Any]) -> Path:
        """Write the entry in a staging directory, then rename it into place (raises OSError if it cannot)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.entry_dir(key)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            (staging / ENGINE_FILE).write_bytes(engine)
            (staging / ENTRY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
            for _ in range(2):
                try:
                    os.rename(staging, final)
                    return final
                except OSError:
                    if isinstance(self.check(key), tuple):
                        return final  # another process stored the same key meanwhile
                    shutil.rmtree(final, ignore_errors=True)
            raise OSError(f"cannot rename {staging} to {final}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def write_engine_file(path: Path, engine: bytes, record: dict[str, Any]) -> None:
    """``path`` and ``path.json``, each written atomically; the record's sha256 ties the pair together."""
    if path.is_dir():
        raise InputError(f"output: {path} is a directory; expected a file path such as model.engine")
    write_atomic(path, engine)
    write_atomic(sidecar_path(path), json.dumps(record, indent=1, sort_keys=True).encode())


def read_engine_file(path: Path) -> tuple[bytes, dict[str, Any]]:
    """An engine and its verified record; errors say how to rebuild."""
    rebuild = "rebuild it: reformer-rt build MODEL.onnx -o " + str(path)
    try:
        engine = path.read_bytes()
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EngineFileError(f"{exc.filename}: missing; an engine needs its record {sidecar_path(path).name} "
                              f"beside it; {rebuild}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineFileError(f"{path}: cannot read the engine or its record ({exc}); {rebuild}") from exc
    problem = verify_record(engine, record)
    if problem:
        raise EngineFileError(f"{path}: {problem}; {rebuild}")
    return engine, record


def check_runtime_match(record: dict[str, Any], tensorrt_version: str, compute_capability: str) -> None:
    """Engines only load on the TensorRT version and GPU architecture they were built with."""
    key = record["key"]
    if (key["tensorrt_version"], key["compute_capability"]) != (tensorrt_version, compute_capability):
        raise EngineFileError(
            f"engine built with TensorRT {key['tensorrt_version']} for {key['gpu_name']} (compute capability "
            f"{key['compute_capability']}); this machine has TensorRT {tensorrt_version} and compute capability "
            f"{compute_capability}; rebuild it here: reformer-rt build {record.get('source', 'MODEL.onnx')} -o ...")


# ----------------------------------------------------------------------------------------------- versions
def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_tensorrt_version(version: str) -> None:
    if parse_version(version)[:2] < MIN_TENSORRT:
        raise BackendUnavailable(f"TensorRT {version} is installed; reformer-rt needs >= "
                                 f"{'.'.join(map(str, MIN_TENSORRT))}: {INSTALL_HINT}")


def strong_typing_flags(version: str, available: Collection[str]) -> tuple[str, ...]:
    """Network creation flags for a strongly typed network: STRONGLY_TYPED on 10.x; none on 11.x (the default)."""
    if parse_version(version)[:1] >= (11,):
        return ()
    if "STRONGLY_TYPED" not in available:
        raise BackendUnavailable(f"TensorRT {version} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED; "
                                 f"{INSTALL_HINT}")
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
@dataclasses.dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    index: int


def import_tensorrt() -> ModuleType:
    """The TensorRT module, checked; ``BackendUnavailable`` saying what to install otherwise."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        where = getattr(trt, "__file__", None) or list(getattr(trt, "__path__", []))
        raise BackendUnavailable(f"'tensorrt' at {where} is not the TensorRT library (type stubs alone, such as "
                                 f"the tensorrt-stubs package, install an empty 'tensorrt' package): {INSTALL_HINT}")
    check_tensorrt_version(trt.__version__)
    return trt


def import_plugin() -> ModuleType:
    """The LSH plugin module (registers its creator); ``BackendUnavailable`` if its dependencies are missing."""
    try:
        return importlib.import_module(PLUGIN_MODULE)
    except ImportError as exc:
        raise BackendUnavailable(f"the LSHAttention TensorRT plugin cannot load: {exc}") from exc


def gpu_info(device: str = "cuda") -> GpuInfo:
    import torch

    try:
        where = torch.device(device)
    except RuntimeError as exc:
        raise BackendUnavailable(f"device: got {device!r}; expected 'cuda' or 'cuda:N'") from exc
    if where.type != "cuda":
        raise BackendUnavailable(f"device: got {device!r}; TensorRT runs on CUDA devices ('cuda' or 'cuda:N')")
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"TensorRT needs a CUDA GPU; torch {torch.__version__} sees none (a CPU-only "
                                 "torch build, no driver, or CUDA_VISIBLE_DEVICES empty)")
    index = torch.cuda.current_device() if where.index is None else where.index
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(torch.cuda.get_device_name(index), f"{major}.{minor}", index)


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


def plugin_metadata(path: Path) -> dict[str, Any]:
    """The reformer_rt metadata of a plugin-form ONNX export, or a clear error."""
    from reformer_rt.export import read_metadata

    if not path.is_file():
        raise InputError(f"{path}: not a file; expected an ONNX file from reformer-rt export --attention plugin")
    try:
        metadata = read_metadata(path)
    except Exception as exc:  # onnx raises protobuf's DecodeError and others for a file that is not ONNX
        raise InputError(f"{path}: cannot read it as ONNX ({exc})") from exc
    if "config" not in metadata or "export_options" not in metadata:
        raise InputError(f"{path}: no reformer_rt metadata; expected a file written by reformer-rt export")
    attention = metadata["export_options"].get("attention")
    if attention != "plugin":
        raise InputError(f"{path}: attention={attention!r}; TensorRT engines need the plugin form (one "
                         "LSHAttention node per layer): reformer-rt export CHECKPOINT -o MODEL.onnx --attention plugin")
    return metadata


def engine_for(onnx_path: Path, options: BuildOptions, cache: EngineCache | None, device: str = "cuda",
               log: Callable[[str], None] = print) -> BuiltEngine:
    """The engine for ``onnx_path`` under ``options``: from ``cache`` when a valid entry exists, else built."""
    start = time.perf_counter()
    metadata = plugin_metadata(onnx_path)
    trt = import_tensorrt()
    gpu = gpu_info(device)
    key = EngineKey(onnx_sha256(onnx_path), trt.__version__, gpu.name, gpu.compute_capability, options.profile,
                    options.workspace_mib, options.tf32)
    found = cache.load(key, log) if cache is not None else None
    if found is not None:
        return BuiltEngine(found[0], found[1], True, time.perf_counter() - start)
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
    if names != sorted(INPUT_NAMES):
        raise EngineBuildError(f"ONNX inputs {names}; expected {sorted(INPUT_NAMES)} (a reformer-rt export)")
    profile = builder.create_optimization_profile()
    low, opt, high = (trt.Dims(list(shape)) for shape in (options.profile.min, options.profile.opt,
                                                           options.profile.max))
    for name in INPUT_NAMES:
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
