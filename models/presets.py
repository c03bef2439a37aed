"""Named model configurations and random-weight models: the architectures benchmarks run without a checkpoint, the
bundled demo model's directory, and the tiny perturbed LM that the doctor's self-tests and the test suite share.

* ``CRIME_AND_PUNISHMENT``: google/reformer-crime-and-punishment's architecture (6 layers local/LSH, d=256,
  2 heads x 128, 1 hash round, chunk 64, axial positions 512 x 1024 = 524,288 tokens, buckets 64 x 128).
* ``ENWIK8_LIKE``: the enwik8 checkpoint's widths at 6 layers (d=512, 8 heads x 64, 4 hash rounds, chunk 128,
  buckets 32 x 32, 65,536 positions).
* ``CRIME_AND_PUNISHMENT_1M``: the same widths at 1,048,576 positions (axial 1024 x 1024), buckets by HF's rule
  for that length (``resolve_num_buckets``: 2 * 1,048,576 / 64 = 2**15, factorized 128 x 256) -- the paper's
  "about a million tokens".
* ``ARCHITECTURES``: those three by the names ``reformer-rt bench --arch`` takes.
* ``random_model(config)``: a model of ``config`` whose every parameter is perturbed from its initial value (default
  initialisation leaves layer norms at 1/0 and axial tables alike, which would hide wrong wiring), seeded.
* ``TINY``: a 3-layer LM (LSH, local, LSH; 2 hash rounds; chunk 8; 64 positions) small enough to export and build in
  seconds.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .config import ReformerConfig, resolve_num_buckets
from .modeling import ReformerLM

CRIME_AND_PUNISHMENT = ReformerConfig(
    vocab_size=320, hidden_size=256, num_attention_heads=2, attention_head_size=128,
    attn_layers=("local", "lsh", "local", "lsh", "local", "lsh"), feed_forward_size=512, hidden_act="relu",
    is_decoder=True, axial_pos_embds=True, axial_pos_shape=(512, 1024), axial_pos_embds_dim=(64, 192),
    max_position_embeddings=524288, lsh_attn_chunk_length=64, local_attn_chunk_length=64, num_hashes=1,
    num_buckets=(64, 128), hash_seed=0, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
    local_num_chunks_before=1, local_num_chunks_after=0)
ENWIK8_LIKE = ReformerConfig(
    vocab_size=258, hidden_size=512, num_attention_heads=8, attention_head_size=64,
    attn_layers=("local", "lsh", "local", "lsh", "local", "lsh"), feed_forward_size=2048, hidden_act="relu",
    is_decoder=True, axial_pos_embds=True, axial_pos_shape=(256, 256), axial_pos_embds_dim=(128, 384),
    max_position_embeddings=65536, lsh_attn_chunk_length=128, local_attn_chunk_length=128, num_hashes=4,
    num_buckets=(32, 32), hash_seed=0, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
    local_num_chunks_before=1, local_num_chunks_after=0)
MILLION = 1 << 20
CRIME_AND_PUNISHMENT_1M = dataclasses.replace(
    CRIME_AND_PUNISHMENT, axial_pos_shape=(1024, 1024), max_position_embeddings=MILLION,
    num_buckets=resolve_num_buckets(MILLION, CRIME_AND_PUNISHMENT.lsh_attn_chunk_length, MILLION))
#: Architectures built with random weights when no checkpoint is given (``reformer-rt bench --arch``).
ARCHITECTURES = {"crime-and-punishment": CRIME_AND_PUNISHMENT, "crime-and-punishment-1m": CRIME_AND_PUNISHMENT_1M,
                 "enwik8-like": ENWIK8_LIKE}

TINY = ReformerConfig(vocab_size=32, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                      attn_layers=("lsh", "local", "lsh"), feed_forward_size=64, axial_pos_embds=False,
                      max_position_embeddings=64, lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_hashes=2,
                      num_buckets=4, hash_seed=1, is_decoder=True)


def demo_model_dir() -> Path:
    """The bundled demo model's checkpoint directory (``models/demo``, installed with the package)."""
    return Path(str(resources.files("reformer_rt.models") / "demo"))


def random_model(config: ReformerConfig = TINY, model_class: type[nn.Module] = ReformerLM, seed: int = 0,
                 scale: float = 0.2) -> nn.Module:
    """A ``model_class`` of ``config`` in eval mode, initialised from ``seed`` and every parameter then moved by
    Gaussian noise of standard deviation ``scale`` (0: the plain initialisation)."""
    torch.manual_seed(seed)
    model = model_class(config)
    if scale:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * scale)
    return model.eval()
