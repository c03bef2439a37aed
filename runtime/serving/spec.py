"""Which models a host serves: ``ModelSpec`` parsed once from the command line or a config file, opened into a
Session with the host's defaults. ``reformer-rt serve``, ``serve --ray`` (and a Ray Serve config file) and the
Triton model repository all describe their models this way.

    ModelSpec.parse("enwik8=ckpt/")                         # NAME=PATH; a bare PATH is named by its stem
    ModelSpec.from_config("small", {"path": "m.onnx", "backend": "onnxruntime"})
    spec.open(SessionDefaults(device="cpu", threads=2))     # -> Session; the spec's own fields win
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reformer_rt.models import InputError

from ..batching import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:
    from ..session import Session

#: Per-model fields a config file may set besides ``path``.
SPEC_FIELDS = ("backend", "device", "dtype", "quantize")


@dataclasses.dataclass(frozen=True)
class SessionDefaults:
    """What every model of a host gets unless its spec says otherwise."""

    backend: str = "auto"
    device: str | None = None
    dtype: str = "float32"
    threads: int = 0
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS
    quantize: str | None = None  # "int8": checkpoints run with int8 weight products (int8 exports always do)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=PATH``, or ``PATH`` named by its file stem or directory name."""
        name, _, path = text.rpartition("=") if "=" in text else ("", "", text)
        name = name or Path(path).stem or Path(path).name
        if not name or not path:
            raise InputError(f"model {text!r}: expected NAME=PATH or PATH")
        return cls(name, path)

    @classmethod
    def from_config(cls, name: str, value: Any, where: str = "models") -> ModelSpec:
        """A config file's entry: a path, or an object with ``path`` and optionally ``backend``, ``device``,
        ``dtype``, ``quantize``; ``where`` names the file or option in errors."""
        entry = {"path": value} if isinstance(value, str) else value
        valid = isinstance(entry, dict) and isinstance(entry.get("path"), str) \
            and not set(entry) - {"path", *SPEC_FIELDS} \
            and all(entry.get(field) is None or isinstance(entry[field], str) for field in SPEC_FIELDS)
        if not valid:
            raise InputError(f"{where}: model {name!r}: got {value!r}; expected a path or an object with 'path' (and "
                             f"optionally {', '.join(repr(f) for f in SPEC_FIELDS)}, each a string)")
        return cls(name, entry["path"], *(entry.get(field) for field in SPEC_FIELDS))

    def as_config(self) -> dict[str, str]:
        """The config-file form (``from_config`` reads it back)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "name" and value is not None}

    def open(self, defaults: SessionDefaults = SessionDefaults()) -> Session:
        from ..session import Session

        return Session(self.path, backend=self.backend or defaults.backend, device=self.device or defaults.device,
                       threads=defaults.threads, max_tokens_per_batch=defaults.max_tokens_per_batch,
                       dtype=self.dtype or defaults.dtype, quantize=self.quantize or defaults.quantize)


def model_specs(given: list[str], configured: Any, default: ModelSpec | None = None,
                where: str = "models") -> list[ModelSpec]:
    """The specs of a config's ``models`` mapping (``where`` names it in errors), then the command line's
    ``NAME=PATH`` words (a name given twice is refused); ``default`` when there are none."""
    specs: dict[str, ModelSpec] = {}
    if configured is not None:
        if not isinstance(configured, dict):
            raise InputError(f"{where}: 'models' must map names to paths or to {{\"path\": ...}} objects, such as "
                             "{\"demo\": \"models/demo\"}")
        specs = {name: ModelSpec.from_config(name, value, where) for name, value in configured.items()}
    for text in given:
        spec = ModelSpec.parse(text)
        if spec.name in specs:
            raise InputError(f"model {spec.name!r}: given twice; name each model once (NAME=PATH)")
        specs[spec.name] = spec
    if not specs and default is not None:
        specs[default.name] = default
    return list(specs.values())
