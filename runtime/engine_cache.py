"""Engine records and the engine cache: what an engine was built from, and where a built engine is kept.

* ``EngineKey``: everything an engine depends on (ONNX sha256 incl. external data, TensorRT version, GPU name and
  compute capability, profile, workspace, TF32, op id + version, ``ENGINE_FORMAT``); its digest names the entry.
* A record (``make_record``) goes with every engine: its key and sha256, and the ONNX metadata the runtime needs.
* ``EngineCache``: entries under ``root/<key digest>/`` (engine + ``entry.json``), renamed into place complete;
  ``check`` gives a verified ``CachedEngine`` or a ``CacheMiss`` saying why not, and an entry whose key or hash does
  not check out is deleted and rebuilt.
* Engine files: ``MODEL.engine`` with its record ``MODEL.engine.json`` beside it, each written atomically.

Plain Python (hashlib, json): no TensorRT here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reformer_rt.models import ReformerError
from reformer_rt.models.lsh import OP_ID, OP_VERSION

from .artifacts import cache_dir, write_files_atomic
from .engine_profiles import Profile

ENGINE_FORMAT = 1  # bump when the build recipe or the record layout changes: old cache entries stop matching
ENGINE_FILE, ENTRY_FILE = "engine.plan", "entry.json"


class EngineFileError(ReformerError):
    """An engine file that is missing, corrupt, unpaired with its record, or built for another machine."""


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


@dataclasses.dataclass(frozen=True)
class CachedEngine:
    """A verified cache entry: the serialized engine and its record."""

    engine: bytes
    record: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CacheMiss:
    """Why a key has no usable entry. ``absent``: nothing is stored under it; otherwise the entry is damaged or
    stale, and is discarded."""

    reason: str
    absent: bool = False


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
    """Engines under ``root/<key digest>/``; entries appear complete (directory rename) or not at all. The default
    root is ``engines/`` in the cache directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "engines"

    def entry_dir(self, key: EngineKey) -> Path:
        return self.root / key.digest()[:32]

    def check(self, key: EngineKey) -> CachedEngine | CacheMiss:
        """The verified entry, or why there is none."""
        directory = self.entry_dir(key)
        try:
            engine = (directory / ENGINE_FILE).read_bytes()
            record = json.loads((directory / ENTRY_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return CacheMiss("no entry", absent=True)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return CacheMiss(f"unreadable entry ({exc})")
        problem = verify_record(engine, record)
        if problem is None and record.get("key") != key.as_dict():
            problem = "entry was stored under another key"
        return CacheMiss(problem) if problem else CachedEngine(engine, record)

    def load(self, key: EngineKey, log: Callable[[str], None] = print) -> CachedEngine | None:
        """A verified entry, or None; a corrupt entry is deleted (so the caller rebuilds it)."""
        found = self.check(key)
        if isinstance(found, CachedEngine):
            return found
        if not found.absent:
            log(f"engine cache: discarding {self.entry_dir(key)}: {found.reason}")
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
                    if isinstance(self.check(key), CachedEngine):
                        return final  # another process stored the same key meanwhile
                    shutil.rmtree(final, ignore_errors=True)
            raise OSError(f"cannot rename {staging} to {final}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def write_engine_file(path: Path, engine: bytes, record: dict[str, Any]) -> None:
    """``path`` and ``path.json`` as one set (both new or neither); the record's sha256 ties the pair together."""
    write_files_atomic({path: engine, sidecar_path(path): json.dumps(record, indent=1, sort_keys=True).encode()},
                       label="-o")


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
