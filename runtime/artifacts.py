"""The files the runtime reads, writes and caches -- shared by the Session, the TensorRT modules and the server.

* ``artifact_kind``: a checkpoint directory, an ``.onnx`` export or a TensorRT engine.
* ``cache_dir``: ``$REFORMER_RT_CACHE``, else ``~/.cache/reformer-rt`` (ONNX exports under ``onnx/``, engines under
  ``engines/``).
* ``cached_export``: a checkpoint's ONNX export, made once and kept in the cache, keyed by the checkpoint's bytes,
  the package version and the quantization (an int8 export is its own entry).
* ``files_sha256`` / ``onnx_sha256``: content hashes that name cache entries.
* ``write_files_atomic`` / ``write_atomic``: the one way the runtime writes files -- a set of files (``run -o
  x.npy`` writes ``x.npy`` and ``x.lengths.npy``) appears complete or not at all, with the user's umask; a failure
  or an interrupt leaves every target as it was and no temporary file behind.

A leaf of the runtime: it imports ``reformer_rt.models`` and (lazily) ``reformer_rt.export``, nothing else of
``reformer_rt.runtime``, so every other runtime module can build on it without import cycles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from reformer_rt.models import InputError
from reformer_rt.models.checkpoint import CONFIG_FILE
from reformer_rt.models.errors import os_error_hint, raise_if_stopped

if TYPE_CHECKING:  # the export package is imported where it is used (this module is a leaf)
    from reformer_rt.export.metadata import Quantization

log = logging.getLogger("reformer_rt")

CACHE_ENV = "REFORMER_RT_CACHE"
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


def max_length_of(path: Path) -> int:
    """The longest input the model at ``path`` accepts, read from its files without loading it (a checkpoint's
    ``max_input_length``, an export's or an engine's recorded ``max_length``)."""
    path = Path(path)
    kind = artifact_kind(path)
    if kind == "checkpoint":
        from reformer_rt.models import ReformerConfig

        return ReformerConfig.from_json_file(path / CONFIG_FILE).max_input_length
    from reformer_rt.export.metadata import ExportInfo, export_info

    if kind == "onnx":
        return export_info(path).max_length
    rebuild = "rebuild the engine with reformer-rt build"
    try:
        record = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read its record {path.name}.json ({exc}); {rebuild}") from exc
    metadata = record.get("metadata") if isinstance(record, dict) else None
    return ExportInfo.parse(metadata, where=f"{path}: its record {path.name}.json", fix=rebuild).max_length


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


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file's tensors name (its weights live there when they pass 2 GB)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)]
    return [path.parent / location for location in sorted({e.value for t in tensors for e in t.external_data
                                                            if e.key == "location"})]


def onnx_sha256(path: Path) -> str:
    """sha256 of an ONNX file and every external-data file it names."""
    return files_sha256([path, *external_data_files(path)])


# -------------------------------------------------------------------------------------------------------- writing
#: What a file of a set is made of: its bytes, a function writing them to a handle, or a file already written in the
#: target's directory (``staging_file``), moved into place as it is.
Payload = bytes | Callable[[BinaryIO], None] | Path


def staging_file(path: Path) -> Path:
    """A new empty temporary file beside ``path``, for a payload written in place (a memory map) before
    ``write_files_atomic`` moves it there; that call removes it whatever happens."""
    descriptor, temporary = tempfile.mkstemp(dir=Path(path).absolute().parent, prefix=f".{Path(path).name}.")
    os.close(descriptor)
    return Path(temporary)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _stage(path: Path, data: Payload) -> str:
    """``data`` written, flushed and given open()'s permissions (0666 less the umask, not mkstemp's 0600) in a
    temporary file beside ``path``; returns its name."""
    if isinstance(data, Path):
        with open(data, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(data, 0o666 & ~_umask())
        return str(data)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def _set_aside(path: Path) -> str:
    """A second name for the current ``path`` (a hard link, else a rename), so a failed set can put it back."""
    backup = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.old"))
    try:
        os.link(path, backup)
    except OSError:
        os.replace(path, backup)
    return backup


def write_files_atomic(files: Mapping[Path, Payload], label: str = "output") -> None:
    """Write ``files`` (path -> a ``Payload``) as one set: each is staged in a
    temporary file in its own directory, then all are renamed into place. Any failure -- an unwritable directory,
    a full disk, an interrupt -- leaves every path as it was (an old file is kept, no new one appears beside it)
    and no temporary file behind.

    ``label`` names the option or file in errors (``--output: cannot write ...``)."""
    targets = {Path(path).absolute(): data for path, data in files.items()}
    if not targets:
        return
    for path in targets:
        if path.is_dir():
            raise InputError(f"{label}: {path} is a directory; expected a file path")
    staged: dict[Path, str] = {}
    backups: dict[Path, str] = {}
    committed: list[Path] = []
    current = next(iter(targets))
    try:
        for current, data in targets.items():
            staged[current] = _stage(current, data)
        raise_if_stopped()
        for current, temporary in staged.items():
            if len(targets) > 1 and current.exists():
                backups[current] = _set_aside(current)
            os.replace(temporary, current)
            committed.append(current)
    except BaseException as exc:
        for path in reversed(committed):
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                os.unlink(path)
        if isinstance(exc, OSError):
            raise InputError(f"{label}: cannot write {current} ({os_error_hint(exc)})") from exc
        raise
    finally:
        written = [str(data) for data in targets.values() if isinstance(data, Path)]  # also when never staged
        for leftover in [*staged.values(), *backups.values(), *written]:
            if os.path.lexists(leftover):
                os.unlink(leftover)


def write_atomic(path: Path, data: Payload, label: str = "output") -> None:
    """Write one file, complete or not at all (``write_files_atomic`` with a single file)."""
    write_files_atomic({Path(path): data}, label)


# ------------------------------------------------------------------------------------------------ cached exports
def _writable_cache(name: str) -> Path:
    """``cache_dir() / name``, created, with a clear error when it cannot be written."""
    directory = cache_dir() / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        raise InputError(f"cache: cannot write {directory} ({os_error_hint(exc)}); set {CACHE_ENV} to a writable "
                         "directory") from exc
    return directory


def _entry_files(entry: Path) -> list[Path]:
    """A cached export's files: the graph and, over 2 GB, its external data beside it."""
    data = entry.with_name(entry.name + ".data")
    return [entry, data] if data.exists() else [entry]


def _entry_intact(entry: Path, record: Path) -> bool:
    """Whether the cached export and its recorded sha256 agree (False when either is missing or unreadable)."""
    try:
        return entry.is_file() and record.read_text(encoding="ascii").strip() == files_sha256(_entry_files(entry))
    except (OSError, UnicodeDecodeError):
        return False


def cached_export(checkpoint: Path, attention: str = "portable", verbose: bool = False,
                  quantization: Quantization | None = None) -> Path:
    """An ONNX export of ``checkpoint`` in the given LSH form (and quantization), made once and kept in the cache
    directory.

    The cache key covers the checkpoint's files, the package version (a new exporter re-exports) and the
    quantization asked for: the scheme and which parts stay float (``Quantization.to_json`` without what the tool
    fills in). The export
    itself is atomic (``export_onnx`` writes through a temporary file), and its sha256 is recorded beside it
    (``<entry>.sha256``) and checked on every use: an entry that was damaged since, or whose record is missing,
    is exported again."""
    from reformer_rt.export import export_onnx
    from reformer_rt.export.metadata import package_version

    files = sorted(f for f in checkpoint.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"))
    asked = "" if quantization is None else f":{quantization.scheme}:{','.join(quantization.fp32)}"
    digest = hashlib.sha256(f"{package_version()}:{files_sha256(files)}{asked}".encode()).hexdigest()
    suffix = "" if quantization is None else f"-{quantization.scheme}"
    target = cache_dir() / "onnx" / f"{digest[:24]}-{attention}{suffix}.onnx"
    record = target.with_name(target.name + ".sha256")
    if _entry_intact(target, record):
        return target
    if target.exists():
        log.warning("reformer-rt: cached export %s does not match its recorded sha256; exporting it again", target)
    _writable_cache("onnx")
    log.info("reformer-rt: exporting %s to %s (%s form%s, once)", checkpoint, target, attention, suffix)
    export_onnx(checkpoint, target, attention=attention, quantize=quantization,
                log=(lambda line: print(line, file=sys.stderr)) if verbose else log.info)
    write_atomic(record, files_sha256(_entry_files(target)).encode(), label="cache")
    return target


def cached_pieces(model: object) -> Path:
    """The piece graphs of the streamed evaluation (``reformer_rt.export.pieces``) for ``model``'s config, made once
    and kept in the cache directory (``pieces/``). They hold no weights, so the key is the resolved config, whether
    the model has an LM head, and the package version; a set whose manifest or graphs are missing is exported
    again, into a temporary directory renamed into place."""
    import shutil

    from reformer_rt.export.metadata import package_version
    from reformer_rt.export.pieces import export_pieces, read_manifest

    body = getattr(model, "reformer", model)
    head = getattr(model, "lm_head", None)
    key = f"{package_version()}:{head is not None}:{body.config.to_json()}"
    target = cache_dir() / "pieces" / hashlib.sha256(key.encode()).hexdigest()[:24]
    if read_manifest(target) is not None:
        return target
    parent = _writable_cache("pieces")
    log.info("reformer-rt: exporting the streamed pieces of %s to %s (once)", type(model).__name__, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        export_pieces(body, head, staging)
        if target.exists() and read_manifest(target) is None:  # a damaged set: replaced whole
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as exc:
        if read_manifest(target) is not None:  # another process put the same set in place first
            return target
        raise InputError(f"cache: cannot write {target} ({os_error_hint(exc)}); set {CACHE_ENV} to a writable "
                         "directory") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
