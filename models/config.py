"""ReformerConfig: the model hyper-parameters, read from HF transformers' ``config.json`` field names.

A frozen dataclass validated at construction, so a bad field fails when the config is read and never inside
``forward``. Two fields HF leaves open are pinned down here, because an exported graph or an engine must hash
exactly like the PyTorch model it came from:

* ``hash_seed=None`` (HF: draw fresh rotations from the global RNG on every call) becomes
  ``DEFAULT_HASH_SEED``; the rotations are then a deterministic buffer, identical to what a seeded HF model draws.
* ``num_buckets=None`` (HF: decided from the length of the *first* input the model sees) is resolved from a
  declared maximum length with HF's own formula (``resolve_num_buckets``), by default
  ``max_position_embeddings``.

``resolved()`` returns the config with both decided; it is what ``save_pretrained`` writes, so a saved model
hashes the same everywhere. Field names and meaning: transformers' ``ReformerConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Seed used for the hash rotations when a checkpoint has ``hash_seed: null``.
DEFAULT_HASH_SEED = 0

ATTENTION_TYPES = ("lsh", "local")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish")
#: Fields whose JSON type is not checked by their value checks below: a string where a list belongs would
#: otherwise become a tuple of characters, and "false" would be a true bool.
_LIST_FIELDS = ("attn_layers", "axial_pos_shape", "axial_pos_embds_dim")
_BOOL_FIELDS = ("is_decoder", "axial_pos_embds")
#: HF's ``problem_type`` values (the loss a classifier was trained with; inference reads it for probabilities).
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

BucketSpec = int | tuple[int, ...] | None


def _as_buckets(value: Any) -> BucketSpec:
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ConfigError(f"num_buckets: got {value!r}; expected null, an even int, or a list of even ints")


@dataclasses.dataclass(frozen=True)
class ReformerConfig:
    """Hyper-parameters of a Reformer; defaults are transformers' ``ReformerConfig`` defaults."""

    vocab_size: int = 320
    hidden_size: int = 256
    num_attention_heads: int = 12
    attention_head_size: int = 64
    attn_layers: tuple[str, ...] = ("local", "lsh", "local", "lsh", "local", "lsh")
    feed_forward_size: int = 512
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-12
    is_decoder: bool = False
    # Position embeddings: axial (two factor tables whose outer product covers max_position_embeddings) or plain.
    axial_pos_embds: bool = True
    axial_pos_shape: tuple[int, ...] = (64, 64)
    axial_pos_embds_dim: tuple[int, ...] = (64, 192)
    max_position_embeddings: int = 4096
    # LSH attention.
    lsh_attn_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    num_hashes: int = 1
    num_buckets: BucketSpec = None
    hash_seed: int | None = None
    # Local attention.
    local_attn_chunk_length: int = 64
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    # Memory: 0 = unchunked (HF semantics); the values change memory, never results.
    chunk_size_feed_forward: int = 0
    chunk_size_lm_head: int = 0
    pad_token_id: int | None = 0
    eos_token_id: int | None = 2
    # Heads (ReformerForSequenceClassification / ReformerForQuestionAnswering): the label names in id order (HF's
    # ``id2label``; ``num_labels`` is their count) and HF's ``problem_type``. None: the checkpoint has no head.
    labels: tuple[str, ...] | None = None
    problem_type: str | None = None

    def __post_init__(self) -> None:
        for name in _LIST_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name}: got {value!r} ({type(value).__name__}); expected a list")
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: got {value!r} ({type(value).__name__}); expected true or false")
        object.__setattr__(self, "attn_layers", tuple(self.attn_layers))
        object.__setattr__(self, "axial_pos_shape", tuple(self.axial_pos_shape))
        object.__setattr__(self, "axial_pos_embds_dim", tuple(self.axial_pos_embds_dim))
        object.__setattr__(self, "num_buckets", _as_buckets(self.num_buckets))
        if self.labels is not None:
            if not isinstance(self.labels, (list, tuple)) or not self.labels \
                    or not all(isinstance(label, str) for label in self.labels):
                raise ConfigError(f"labels: got {self.labels!r}; expected a non-empty list of label names")
            object.__setattr__(self, "labels", tuple(self.labels))
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type: got {self.problem_type!r}; expected null or one of {PROBLEM_TYPES}")
        self._validate()

    # ----------------------------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "attention_head_size", "feed_forward_size",
                     "max_position_embeddings", "lsh_attn_chunk_length", "local_attn_chunk_length", "num_hashes"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("lsh_num_chunks_before", "lsh_num_chunks_after", "local_num_chunks_before",
                     "local_num_chunks_after", "chunk_size_feed_forward", "chunk_size_lm_head"):
            _check_int(name, getattr(self, name), low=0)
        if not self.attn_layers:
            raise ConfigError("attn_layers: got an empty list; expected at least one of 'lsh', 'local'")
        bad = [t for t in self.attn_layers if t not in ATTENTION_TYPES]
        if bad:
            raise ConfigError(f"attn_layers: got unknown attention type(s) {bad}; expected each of {ATTENTION_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act: got {self.hidden_act!r}; expected one of {ACTIVATIONS}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
            raise ConfigError(f"layer_norm_eps: got {eps!r}; expected a positive finite number")
        if self.hash_seed is not None:
            _check_int("hash_seed", self.hash_seed, low=0)
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0, high=self.vocab_size - 1)
        self._validate_buckets()
        if self.axial_pos_embds:
            self._validate_axial()

    def _validate_buckets(self) -> None:
        factors = (self.num_buckets,) if isinstance(self.num_buckets, int) else (self.num_buckets or ())
        for f in factors:
            if f < 2 or f % 2:
                raise ConfigError(
                    f"num_buckets: got {self.num_buckets!r}; every bucket count must be an even int >= 2 "
                    "(hashing takes argmax over [xR, -xR], so each factor is twice a rotation size)")
        if isinstance(self.num_buckets, tuple) and not self.num_buckets:
            raise ConfigError("num_buckets: got an empty list; expected null, an even int, or a list of even ints")

    def _validate_axial(self) -> None:
        if len(self.axial_pos_shape) != 2 or len(self.axial_pos_embds_dim) != 2:
            raise ConfigError(
                f"axial_pos_shape / axial_pos_embds_dim: got {list(self.axial_pos_shape)} / "
                f"{list(self.axial_pos_embds_dim)}; expected two factors each (HF's inference path supports two)")
        for name in ("axial_pos_shape", "axial_pos_embds_dim"):
            for v in getattr(self, name):
                _check_int(name, v, low=1)
        if math.prod(self.axial_pos_shape) != self.max_position_embeddings:
            raise ConfigError(
                f"axial_pos_shape: got {list(self.axial_pos_shape)} (product {math.prod(self.axial_pos_shape)}); "
                f"expected factors whose product equals max_position_embeddings={self.max_position_embeddings}")
        if sum(self.axial_pos_embds_dim) != self.hidden_size:
            raise ConfigError(
                f"axial_pos_embds_dim: got {list(self.axial_pos_embds_dim)} (sum {sum(self.axial_pos_embds_dim)}); "
                f"expected dims that sum to hidden_size={self.hidden_size}")

    # ------------------------------------------------------------------------------------------- derived values
    @property
    def num_layers(self) -> int:
        return len(self.attn_layers)

    @property
    def num_labels(self) -> int:
        """Outputs of a classification or QA head (HF: ``len(id2label)``, 2 when unset)."""
        return len(self.labels) if self.labels is not None else 2

    @property
    def chunk_multiple(self) -> int:
        """Inputs longer than ``min_chunk_length`` are padded to a multiple of this (HF: lcm of chunk lengths)."""
        return math.lcm(*(self._chunk_length(t) for t in set(self.attn_layers)))

    @property
    def min_chunk_length(self) -> int:
        return min(self._chunk_length(t) for t in set(self.attn_layers))

    def _chunk_length(self, attention_type: str) -> int:
        return self.lsh_attn_chunk_length if attention_type == "lsh" else self.local_attn_chunk_length

    def padded_length(self, length: int) -> int:
        """Length the model runs a ``length``-token input at (HF's automatic padding rule)."""
        m = self.chunk_multiple
        if length > self.min_chunk_length and length % m:
            return length + m - length % m
        return length

    @property
    def max_input_length(self) -> int:
        """The longest input that runs: its padded length must stay within ``max_position_embeddings``, so when that
        is not a chunk multiple the answer is the multiple below it (or the shortest chunk, which is never padded)."""
        limit, m = self.max_position_embeddings, self.chunk_multiple
        return max(limit - limit % m, min(self.min_chunk_length, limit))

    def resolved(self, max_length: int | None = None) -> ReformerConfig:
        """This config with ``hash_seed`` and ``num_buckets`` decided (see the module docstring)."""
        seed = DEFAULT_HASH_SEED if self.hash_seed is None else self.hash_seed
        buckets = self.num_buckets
        if buckets is None:
            length = self.max_position_embeddings if max_length is None else max_length
            _check_int("max_length", length, low=1, high=self.max_position_embeddings)
            buckets = resolve_num_buckets(length, self.lsh_attn_chunk_length, self.max_position_embeddings)
        return dataclasses.replace(self, hash_seed=seed, num_buckets=buckets)

    @property
    def is_resolved(self) -> bool:
        return self.hash_seed is not None and self.num_buckets is not None

    # ----------------------------------------------------------------------------------------------------- JSON
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReformerConfig:
        """Build from a transformers-style dict; keys this model does not use (dropouts, ids...) are ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"config: got {type(data).__name__}; expected a JSON object")
        model_type = data.get("model_type", "reformer")
        if model_type != "reformer":
            raise ConfigError(f"model_type: got {model_type!r}; expected 'reformer'")
        known = {f.name for f in dataclasses.fields(cls)} - {"labels"}
        kwargs = {k: v for k, v in data.items() if k in known}
        labels = _labels(data)
        if labels is not None:
            kwargs["labels"] = labels
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a list where an int belongs, etc.
            raise ConfigError(f"config: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | Path) -> ReformerConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config: {path} does not exist; expected a config.json next to the weights") from exc
        except OSError as exc:  # a directory, no permission, an I/O error
            raise ConfigError(f"config: cannot read {path} ({exc.strerror or exc}); expected a readable JSON file "
                              "next to the weights") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config: {path} is not valid JSON ({exc}); re-save the checkpoint") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """transformers-compatible dict: a saved directory also loads in transformers' ``ReformerModel``."""
        data: dict[str, Any] = {"model_type": "reformer"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "labels":
                if value is not None:  # HF's form: id2label with string keys, label2id, num_labels
                    data["id2label"] = {str(i): label for i, label in enumerate(value)}
                    data["label2id"] = {label: i for i, label in enumerate(value)}
                    data["num_labels"] = len(value)
                continue
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _labels(data: dict[str, Any]) -> tuple[str, ...] | None:
    """Label names in id order from HF's ``id2label`` (keys "0".."n-1") or ``num_labels``; None when neither."""
    id2label, count = data.get("id2label"), data.get("num_labels")
    if id2label is None:
        if count is None:
            return None
        _check_int("num_labels", count, low=1)
        return tuple(f"LABEL_{i}" for i in range(count))
    if not isinstance(id2label, dict) or not id2label:
        raise ConfigError(f"id2label: got {id2label!r}; expected an object mapping ids 0..n-1 to label names")
    try:
        ids = sorted(int(key) for key in id2label)
    except (TypeError, ValueError):
        raise ConfigError(f"id2label: keys {sorted(map(str, id2label))}; expected the ids 0..n-1") from None
    if ids != list(range(len(ids))):
        raise ConfigError(f"id2label: keys {ids}; expected the ids 0..{len(ids) - 1}, each once")
    if count is not None and count != len(ids):
        raise ConfigError(f"num_labels: got {count!r}; expected {len(ids)}, the number of id2label entries")
    by_id = {int(key): value for key, value in id2label.items()}
    return tuple(str(by_id[i]) for i in ids)


def resolve_num_buckets(max_length: int, chunk_length: int, max_position_embeddings: int) -> int | tuple[int, int]:
    """HF's ``_set_num_buckets`` rule applied to a declared maximum length instead of the first input's length.

    About two buckets per chunk, rounded down to a power of two (at least 2); factorized into two powers of two
    once it exceeds ``2 * max(sqrt(max_position_embeddings // chunk_length), chunk_length)``.
    """
    power = max((2 * (max_length // chunk_length)).bit_length() - 1, 1)
    limit = 2 * max(int((max_position_embeddings // chunk_length) ** 0.5), chunk_length)
    if 2**power > limit:
        return (2 ** (power // 2), 2 ** (power - power // 2))
    return 2**power


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}: got {value!r} ({type(value).__name__}); expected an int")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}: got {value}; expected an int {bounds}")
