"""The files the runtime reads, writes and caches -- shared by the Session, the TensorRT modules and the server.

* ``artifact_kind``: a checkpoint directory, an ``.onnx`` export or a TensorRT engine.
* ``cache_dir``: ``$REFORMER_RT_CACHE``, else ``~/.cache/reformer-rt`` (ONNX exports under ``onnx/``, engines under
  ``engines/``).
* ``cached_export``: a checkpoint's ONNX export, made once and kept in the cache, keyed by the checkpoint's bytes
  and the package version.
* ``files_sha256`` / ``onnx_sha256``: content hashes that name cache entries.
* ``write_atomic``: the one way the runtime writes a file -- complete or not at all, with the user's umask.
* ``DEFAULT_MAX_TOKENS``: the default token budget of one micro-batch.

A leaf of the runtime: it imports ``reformer_rt.models`` and (lazily) ``reformer_rt.export``, nothing else of
``reformer_rt.runtime``, so every other runtime module can build on it without import cycles.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

from reformer_rt.models import InputError
from reformer_rt.models.checkpoint import CONFIG_FILE

log = logging.getLogger("reformer_rt")

CACHE_ENV = "REFORMER_RT_CACHE"
#: Padded tokens per micro-batch unless the caller says otherwise: 131,072 tokens of the crime-and-punishment
#: architecture peak at about 2 GB on ONNX Runtime's CPU provider, and fill a GPU well without crowding it.
DEFAULT_MAX_TOKENS = 1 << 17
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
ARTIFACT_KINDS = ("checkpoint", "onnx", "engine")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reformer-rt")


def artifact_kind(path: Path) -> str:
    """'checkpoint' (a directory), 'onnx' or 'engine' -- or a clear error."""
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise InputError(f"{path}: a directory without {CONFIG_FILE}; expected a checkpoint directory")
        return "checkpoint"
    if not path.exists():
        raise InputError(f"{path}: does not exist; expected a checkpoint directory, an .onnx file or an engine")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix in ENGINE_SUFFIXES:
        return "engine"
    raise InputError(f"{path}: unknown kind of file; expected a checkpoint directory, *.onnx, or "
                     f"{', '.join('*' + s for s in ENGINE_SUFFIXES)}")


# ------------------------------------------------------------------------------------------------------ hashing
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


# -------------------------------------------------------------------------------------------------------- writing
def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None], label: str = "output") -> None:
    """Write ``data`` (bytes, or a function writing to a binary handle) to ``path`` through a temporary file in
    the same directory, then rename it into place: the file is complete or absent, never partial. The file gets
    the permissions ``open`` would give it (0666 less the umask), not ``mkstemp``'s 0600.

    ``label`` names the option or file in errors (``--output: cannot write ...``)."""
    path = Path(path).absolute()
    if path.is_dir():
        raise InputError(f"{label}: {path} is a directory; expected a file path")
    temporary: str | None = None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(descriptor, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
        temporary = None
    except OSError as exc:
        raise InputError(f"{label}: cannot write {path} ({exc.strerror or exc}); choose a writable directory "
                         "that exists") from exc
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


# ------------------------------------------------------------------------------------------------ cached exports
def cached_export(checkpoint: Path, attention: str = "portable", verbose: bool = False) -> Path:
    """An ONNX export of ``checkpoint`` in the given LSH form, made once and kept in the cache directory.

    The cache key covers the checkpoint's files and the package version (a new exporter re-exports). The export
    itself is atomic (``export_onnx`` writes through a temporary file), so a cache entry is never partial."""
    from reformer_rt.export import export_onnx
    from reformer_rt.export.metadata import package_version

    files = sorted(f for f in checkpoint.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"))
    digest = hashlib.sha256(f"{package_version()}:{files_sha256(files)}".encode()).hexdigest()
    target = cache_dir() / "onnx" / f"{digest[:24]}-{attention}.onnx"
    if not target.exists():
        log.info("reformer-rt: exporting %s to %s (%s form, once)", checkpoint, target, attention)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cache: cannot create {target.parent} ({exc.strerror or exc}); set {CACHE_ENV} to a "
                             "writable directory") from exc
        export_onnx(checkpoint, target, attention=attention,
                    log=(lambda line: print(line, file=sys.stderr)) if verbose else log.info)
    return target
