"""Helpers of the server tests: the served tiny model (``SERVED_LM``), ragged inputs, and ``reformer-rt serve`` as a
real subprocess (``ServerProcess``: 127.0.0.1, ports the OS picks, read back from its startup log)."""

from __future__ import annotations

import time

import numpy as np
from helpers.artifacts import TinyModel

from reformer_rt.models import ReformerConfig
from reformer_rt.runtime.bench.server_process import ServeProcess

#: Byte vocabulary and tokenizer (so the text input is offered), LSH and local layers, 2 hash rounds, chunk 16, up
#: to 2048 tokens (tens of milliseconds a forward pass on the CPU), every parameter perturbed by 0.1.
SERVED_LM = TinyModel("served-lm", ReformerConfig(
    vocab_size=258, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=48,
    attn_layers=("local", "lsh", "local", "lsh"), axial_pos_shape=(32, 64), axial_pos_embds_dim=(8, 24),
    max_position_embeddings=2048, lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=2,
    num_buckets=(4, 8), hash_seed=3, is_decoder=True), scale=0.1, byte_tokenizer=True)
START_TIMEOUT_S = 120


def ragged_sequences(count: int, seed: int, low: int = 1, high: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, SERVED_LM.config.vocab_size, int(rng.integers(low, high)), dtype=np.int64)
            for _ in range(count)]


class ServerProcess(ServeProcess):
    """``reformer-rt serve ARGS`` for a test: ``ServerProcess("tiny=DIR", "--backend", "torch")``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(args, env=env, start_timeout_s=START_TIMEOUT_S)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
