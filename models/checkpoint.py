"""Checkpoint I/O: transformers Reformer directories and this project's own format (the same layout).

Read: ``config.json`` plus ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), or
``pytorch_model.bin`` loaded with ``weights_only=True`` (never unpickles code). Weights are converted to float32:
the PyTorch model is the fp32 reference; fp16 lives in exported graphs.

Key names: HF's models with a head prefix the body with ``reformer.`` and keep their head's keys (LM:
``lm_head.decoder.{weight,bias}`` plus a duplicate ``lm_head.bias``; classification: ``classifier.``; QA:
``qa_outputs.``); a bare ``ReformerModel`` has no prefix. A head the loaded class does not have (``HEAD_PREFIXES``)
is ignored; any missing, unexpected, mis-shaped or non-float tensor of the part being loaded, and any NaN or
infinite weight, is an error naming that tensor.

Write: ``save_pretrained`` writes the resolved config (hash seed and bucket counts decided) and safetensors with
HF key names, so the directory loads here and in transformers alike. Files are written to a temporary directory
and moved into place, so a failed save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import ReformerConfig
from .errors import CheckpointError, os_error_hint, raise_if_stopped

if TYPE_CHECKING:
    from torch import nn

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
BODY_PREFIX = "reformer."
LM_HEAD_PREFIX = "lm_head."


def load(path: str | Path, max_length: int | None = None) -> tuple[ReformerConfig, dict[str, torch.Tensor]]:
    """(resolved config, float32 state dict as stored) from a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory; expected a directory with {CONFIG_FILE} "
                              f"and {SAFETENSORS_FILE} or {TORCH_FILE}")
    config = ReformerConfig.from_json_file(path / CONFIG_FILE).resolved(max_length)
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


def _model_state_from_checkpoint(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to ``model``'s keys; heads the model does not have are dropped."""
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


