"""Random-weight models the tests share, and their checkpoints and ONNX exports, each made at most once per test
session (``Artifacts``, the session fixture ``artifacts`` of ``tests/conftest.py``): a portable export of even the
tiniest model takes 20-40 s on 2 cores (the plugin form about 10 s), a checkpoint milliseconds.

A ``TinyModel`` is a recipe -- config, class, seed and perturbation scale -- built by the one factory,
``reformer_rt.models.presets.random_model``: the same recipe gives the same weights in every module. The recipes
several modules use are here:

* ``BYTE_LM``: vocabulary 258 (the byte tokenizer), local + LSH layers, chunk 8, at most 128 tokens, perturbed by
  0.1; its checkpoint and portable export back the Session (ONNX Runtime backend), hardening, fuzz, export-error,
  generation, serving and Triton-repository tests, and its int8 export the int8 runtime and serving tests.
* ``DOCTOR``: the doctor's self-test model (``presets.TINY``, perturbed by 0.2); its plugin export backs the
  TensorRT-path and Session tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from reformer_rt.export import ExportReport, export_onnx
from reformer_rt.models import ReformerConfig, ReformerLM
from reformer_rt.models.presets import TINY, random_model
from reformer_rt.models.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """``random_model(config, model_class, seed, scale)`` under a name unique among recipes (its cache key)."""

    name: str
    config: ReformerConfig
    seed: int = 0
    scale: float = 0.0
    model_class: type[nn.Module] = ReformerLM
    byte_tokenizer: bool = False  # save the byte tokenizer next to the weights (what a served text model carries)

    def build(self) -> nn.Module:
        return random_model(self.config, self.model_class, self.seed, self.scale)


BYTE_LM = TinyModel("byte-lm", ReformerConfig(
    vocab_size=258, hidden_size=16, num_attention_heads=2, attention_head_size=8, attn_layers=("local", "lsh"),
    feed_forward_size=32, axial_pos_embds=True, axial_pos_shape=(8, 16), axial_pos_embds_dim=(8, 8),
    max_position_embeddings=128, lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_hashes=1, num_buckets=4,
    hash_seed=1, is_decoder=True), scale=0.1)
DOCTOR = TinyModel("doctor", TINY, scale=0.2)


class Artifacts:
    """Checkpoints and exports of ``TinyModel`` recipes under ``root``, each made once and keyed by the recipe's name
    and the export options. What it returns is shared: copy a file or directory before changing it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple[object, ...], Path] = {}
        self._reports: dict[tuple[object, ...], ExportReport] = {}

    def checkpoint(self, model: TinyModel) -> Path:
        key = (model.name,)
        if key not in self._made:
            directory = self.root / model.name
            model.build().save_pretrained(directory)
            if model.byte_tokenizer:
                ByteTokenizer().save(directory)
            self._made[key] = directory
        return self._made[key]

    def export(self, model: TinyModel, attention: str = "portable", dtype: str = "float32",
               max_length: int | None = None, validate: bool = False, quantize: str | None = None) -> Path:
        """``export_onnx`` of the recipe's checkpoint; ``validate`` runs the exporter's check against PyTorch (an
        int8 export is always validated: its task metrics on text)."""
        key = (model.name, attention, dtype, max_length, validate, quantize)
        if key not in self._made:
            path = self.root / ("-".join(map(str, key)) + ".onnx")
            self._reports[key] = export_onnx(self.checkpoint(model), path, attention=attention, dtype=dtype,
                                             max_length=max_length, validate=validate or quantize is not None,
                                             quantize=quantize, log=None)
            self._made[key] = path
        return self._made[key]

    def export_report(self, model: TinyModel, **options: object) -> ExportReport:
        """The exporter's report of ``export(model, **options)`` (made then, if not yet)."""
        self.export(model, **options)  # type: ignore[arg-type]
        key = (model.name, *(options.get(k, d) for k, d in (("attention", "portable"), ("dtype", "float32"),
                                                              ("max_length", None), ("validate", False),
                                                              ("quantize", None))))
        return self._reports[key]


def byte_lm_checkpoint(artifacts: Artifacts) -> Path:
    return artifacts.checkpoint(BYTE_LM)


def byte_lm_export(artifacts: Artifacts) -> Path:
    """``BYTE_LM``'s float portable export, unvalidated."""
    return artifacts.export(BYTE_LM)


def byte_lm_int8_export(artifacts: Artifacts) -> Path:
    """``BYTE_LM``'s int8 portable export, validated by its task metrics on text."""
    return artifacts.export(BYTE_LM, quantize="int8")
