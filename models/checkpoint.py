"""Checkpoint I/O: transformers Reformer directories and this project's own format (the same layout).

Read: ``config.json`` plus ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), or
``pytorch_model.bin`` loaded with ``weights_only=True`` (never unpickles code). Weights are converted to float32:
the PyTorch model is the fp32 reference; fp16 lives in exported graphs.

Key names: HF's models with a head prefix the body with ``reformer.`` and keep their head's keys (LM:
``lm_head.decoder.{weight,bias}`` plus a duplicate ``lm_head.bias``; classification: ``classifier.``; QA:
``qa_outputs.``); a bare ``ReformerModel`` has no prefix. A head the loaded class does not have (``HEAD_PREFIXES``)
is ignored; any missing, unexpected, mis-shaped or non-float tensor of the part being loaded, and any NaN or
infinite weight, is an error naming that tensor.

Config against weights, before anything is allocated: ``check_config`` builds the model's skeleton on the meta
device (shapes only: no memory, no initialisation, no random draws) and compares it with the stored tensors' shapes
-- read from the safetensors header, without loading the data -- so a ``config.json`` that disagrees with its
weights (``vocab_size: 10**12`` beside a 320-row embedding) is one ``ConfigError`` naming the field and both values
instead of a failed terabyte allocation.

Write: ``save_pretrained`` writes the resolved config (hash seed and bucket counts decided) and safetensors with
HF key names, so the directory loads here and in transformers alike. Files are written to a temporary directory
and moved into place, so a failed save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from .config import ReformerConfig
from .errors import CheckpointError, ConfigError, ReformerError, os_error_hint, raise_if_stopped

if TYPE_CHECKING:
    from torch import nn

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
BODY_PREFIX = "reformer."
LM_HEAD_PREFIX = "lm_head."


def read_config(path: str | Path, max_length: int | None = None) -> ReformerConfig:
    """The resolved config of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory; expected a directory with {CONFIG_FILE} "
                              f"and {SAFETENSORS_FILE} or {TORCH_FILE}")
    return ReformerConfig.from_json_file(path / CONFIG_FILE).resolved(max_length)


def load(path: str | Path, max_length: int | None = None) -> tuple[ReformerConfig, dict[str, torch.Tensor]]:
    """(resolved config, float32 state dict as stored) from a checkpoint directory."""
    path = Path(path)
    config = read_config(path, max_length)
    state = {k: v.float() if v.is_floating_point() else v for k, v in _read_weights(path).items()}
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            nan = int(torch.isnan(value).sum())
            raise CheckpointError(f"checkpoint {path}: tensor {key} holds {nan:,} NaN and "
                                  f"{int(torch.isinf(value).sum()):,} infinite weight(s); expected finite weights "
                                  "-- the checkpoint is corrupt or came from a diverged training run")
    return config, state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS_FILE).exists():
        state = _read_safetensors([path / SAFETENSORS_FILE])
    elif (path / SAFETENSORS_INDEX).exists():
        state = _read_safetensors(_shards(path, path / SAFETENSORS_INDEX))
    elif (path / TORCH_FILE).exists():
        state = _read_torch_file(path / TORCH_FILE)
    else:
        raise CheckpointError(f"checkpoint: no weights in {path}; expected {SAFETENSORS_FILE}, "
                              f"{SAFETENSORS_INDEX} or {TORCH_FILE}")
    odd = [key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if odd:
        raise CheckpointError(f"checkpoint {path}: entries {odd[:5]} are not named tensors; expected a state dict "
                              "of tensors")
    return state


def _shards(path: Path, index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names (HF: ``{"weight_map": {tensor: file}}``)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {index} as JSON ({exc}); re-download the checkpoint") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else data
    names = list(weight_map.values()) if isinstance(weight_map, dict) else None
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise CheckpointError(f"checkpoint: {index} has weight_map {str(weight_map)[:80]}; expected an object "
                              "mapping tensor names to shard file names in the same directory -- re-download it")
    return [path / name for name in sorted(set(names))]


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Each stored tensor's shape from the safetensors header(s), reading no tensor data; None for a
    ``pytorch_model.bin`` (its shapes come with its data) or weights that cannot be read (``load`` says why)."""
    from safetensors import SafetensorError, safe_open

    if (path / SAFETENSORS_FILE).exists():
        files = [path / SAFETENSORS_FILE]
    elif (path / SAFETENSORS_INDEX).exists():
        files = _shards(path, path / SAFETENSORS_INDEX)
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        for file in files:
            with safe_open(file, framework="pt") as handle:
                shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    except (SafetensorError, OSError, ValueError):
        return None
    return shapes


class _ShapesOnly(TorchFunctionMode):
    """Under the meta device: parameters and buffers get their shapes and nothing else -- no initialisation and no
    random draws, which on meta tensors would cost seconds of torch's decompositions and mean nothing."""

    _INIT = frozenset({"normal_", "uniform_", "zero_", "zeros_", "ones_", "fill_", "kaiming_uniform_", "trunc_normal_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._INIT:
            return args[0] if args else kwargs["tensor"]
        if func is torch.randn:
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


def skeleton(model_class: type[nn.Module], config: ReformerConfig) -> nn.Module:
    """``model_class(config)`` on the meta device: every tensor's shape, no memory."""
    with torch.device("meta"), _ShapesOnly():
        return model_class(config)


#: Config fields that size tensors: the ones a stored shape can prove wrong.
SIZE_FIELDS = ("vocab_size", "hidden_size", "feed_forward_size", "attention_head_size", "num_attention_heads",
               "max_position_embeddings", "num_labels", "axial_pos_shape", "axial_pos_embds_dim")


def _mismatches(model_class: type[nn.Module], config: ReformerConfig,
                stored: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(key, stored shape, the shape ``config`` builds) for each stored tensor the skeleton has with another shape."""
    expected = {key: tuple(value.shape) for key, value in skeleton(model_class, config).state_dict().items()}
    return [(key, shape, expected[key]) for key, shape in stored.items() if key in expected and shape != expected[key]]


def _fixes(config: ReformerConfig, want: int, got: int) -> list[tuple[str, Any]]:
    """Single-field changes of ``config`` that would turn a ``want`` dimension into the stored ``got``."""
    fixes: list[tuple[str, Any]] = []
    for name in SIZE_FIELDS:
        value = getattr(config, name)
        if value == want:
            fixes.append((name, got))
        elif isinstance(value, tuple) and want in value:
            fixes.append((name, tuple(got if v == want else v for v in value)))
    heads, width = config.num_attention_heads, config.attention_head_size
    if want == heads * width:  # the attention projections' width
        fixes += [("num_attention_heads", got // width)] if got % width == 0 else []
        fixes += [("attention_head_size", got // heads)] if got % heads == 0 else []
    if want == 2 * config.hidden_size and got % 2 == 0:  # the two reversible streams
        fixes.append(("hidden_size", got // 2))
    return fixes


def check_config(model_class: type[nn.Module], config: ReformerConfig, shapes: dict[str, tuple[int, ...]],
                 source: Path) -> None:
    """Before ``model_class(config)`` is built: when stored tensors disagree with the shapes ``config`` gives, a
    ``ConfigError`` naming the config field whose change would make every stored tensor fit (the config is wrong),
    else a ``CheckpointError`` naming the first tensor that does not fit (the tensor is wrong)."""
    stored = {key: tuple(shape) for key, shape in _model_state_from_checkpoint(model_class, shapes).items()}
    mismatches = _mismatches(model_class, config, stored)
    if not mismatches:
        return
    key, shape, want = mismatches[0]
    for want_size, got_size in ((w, g) for w, g in zip(want, shape) if w != g) if len(want) == len(shape) else ():
        for name, value in _fixes(config, want_size, got_size):
            try:
                fixed = dataclasses.replace(config, **{name: value})
            except ReformerError:  # the change breaks another rule (axial dims that must sum to hidden_size...)
                continue
            if not _mismatches(model_class, fixed, stored):
                shown, current = (list(v) if isinstance(v, tuple) else v for v in (value, getattr(config, name)))
                raise ConfigError(f"{source / CONFIG_FILE}: {name}={current} disagrees with the weights, which fit "
                                  f"{name}={shown} (tensor {key} has shape {shape}; the config builds {want}); "
                                  f"expected the config.json of the same model -- set {name} to {shown} or "
                                  "re-download the checkpoint")
    raise CheckpointError(f"checkpoint {source}: tensor {key} has shape {shape}; expected {want} from config.json")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint: cannot read {file} ({exc}); the file is missing or corrupt -- "
                                  "re-download or re-save the checkpoint") from exc
    return state


def _read_torch_file(file: Path) -> dict:
    """A ``pytorch_model.bin`` read with ``weights_only=True``; never unpickles code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or unsafe pickle
        found = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?: was not an allowed global.*)?$", str(exc), re.M)
        detail = found.group(1).strip() if found else str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"checkpoint: cannot read {file} as a state dict of tensors ({detail}); it is "
                              "corrupt or pickles other Python objects, which reformer-rt never loads -- re-save it "
                              "as safetensors (transformers: save_pretrained(..., safe_serialization=True))") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint: {file} holds {type(state).__name__}; expected a state dict")
    return state


def _model_state_from_checkpoint(model: nn.Module | type, state: dict[str, Any]) -> dict[str, Any]:
    """Rename checkpoint keys to ``model``'s keys (a model or its class); heads the model does not have are
    dropped."""
    heads: tuple[str, ...] = getattr(model, "HEAD_PREFIXES", ())
    prefixed = any(k.startswith(BODY_PREFIX) for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if prefixed and not key.startswith(BODY_PREFIX):
            if not key.startswith(heads):
                continue  # another head (classifier, qa_outputs...) or the head of a body-only load
            if key == "lm_head.bias":
                out.setdefault("lm_head.decoder.bias", value)  # HF ties it to lm_head.decoder.bias
                continue
            out[key] = value
            continue
        body_key = key[len(BODY_PREFIX):] if prefixed else key
        out[BODY_PREFIX + body_key if heads else body_key] = value
    return out


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` strictly; errors name the offending tensor."""
    state = _model_state_from_checkpoint(model, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {source}: missing tensor(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); expected by "
                              f"{type(model).__name__} for this config.json -- is config.json from the same model?")
    if unexpected:
        raise CheckpointError(f"checkpoint {source}: unexpected tensor(s) {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all); the weights "
                              "do not match config.json (attn_layers, axial_pos_embds?)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"checkpoint {source}: tensor {key} has shape {tuple(value.shape)}; expected "
                                  f"{tuple(expected[key].shape)} from config.json")
        if value.is_floating_point() != expected[key].is_floating_point():
            raise CheckpointError(f"checkpoint {source}: tensor {key} has dtype {value.dtype}; expected a floating "
                                  f"point tensor ({expected[key].dtype}) -- the checkpoint is corrupt or not a "
                                  "Reformer")
    model.load_state_dict(state, strict=True)


def _make_readable(directory: Path, names: tuple[str, ...]) -> None:
    """Give the temp dir and its files the usual umask permissions (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in names:
        os.chmod(directory / name, 0o666 & ~umask)


def save(model: nn.Module, path: Path) -> None:
    """Write config.json + model.safetensors atomically (into a temp dir, then moved into place)."""
    from safetensors.torch import save_file

    config: ReformerConfig = model.config  # type: ignore[assignment]
    data = config.to_dict()
    data["architectures"] = [model.ARCHITECTURE]  # type: ignore[attr-defined]
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if "lm_head.decoder.bias" in state:
        state["lm_head.bias"] = state["lm_head.decoder.bias"].clone()  # HF's own LM checkpoints carry both
    path = path.absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise CheckpointError(f"save_pretrained: cannot write to {path.parent} ({os_error_hint(exc)})") from exc
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(state, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        _make_readable(tmp, (CONFIG_FILE, SAFETENSORS_FILE))
        raise_if_stopped()
        if path.is_dir():
            for name in (CONFIG_FILE, SAFETENSORS_FILE):
                os.replace(tmp / name, path / name)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"save_pretrained: cannot write {path} ({os_error_hint(exc)})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


