"""A tiny byte-level Reformer LM and its portable ONNX exports, made once per test session and shared by the
hardening, fuzz and int8 tests (``tiny_checkpoint(root)`` / ``tiny_export(root)`` / ``tiny_int8_export(root)`` with
``root`` the session's base temporary directory): vocabulary 258 (the byte tokenizer), local + LSH layers, chunk 8,
at most 128 tokens."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from reformer_rt.export import ExportReport, export_onnx
from reformer_rt.models import ReformerConfig, ReformerLM

CONFIG = ReformerConfig(vocab_size=258, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                        attn_layers=("local", "lsh"), feed_forward_size=32, axial_pos_embds=True,
                        axial_pos_shape=(8, 16), axial_pos_embds_dim=(8, 8), max_position_embeddings=128,
                        lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_hashes=1, num_buckets=4, hash_seed=1,
                        is_decoder=True)


@functools.cache
def tiny_checkpoint(root: Path) -> Path:
    directory = root / "tiny-checkpoint"
    torch.manual_seed(0)
    ReformerLM(CONFIG).save_pretrained(directory)
    return directory


@functools.cache
def tiny_export(root: Path) -> Path:
    path = root / "tiny-portable.onnx"
    export_onnx(tiny_checkpoint(root), path, attention="portable", validate=False, log=None)
    return path


@functools.cache
def tiny_int8_report(root: Path) -> ExportReport:
    """The tiny checkpoint exported with int8 weight products, validated (float graph, then task metrics on text)."""
    return export_onnx(tiny_checkpoint(root), root / "tiny-int8.onnx", attention="portable", quantize="int8", log=None)


def tiny_int8_export(root: Path) -> Path:
    return tiny_int8_report(root).path
