"""Streamed execution (``runtime/streaming.py`` over ``models/streamed.py``): the driver over torch pieces equals the
model's fused forward; ONNX Runtime's piece graphs equal the torch pieces; a Session streams long rows and gives
every output as its whole-sequence path does; ``out=`` receives exactly what memory would have held."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reformer_rt.models import InputError, ReformerConfig, ReformerLM, ReformerModel
from reformer_rt.models.fused import fused_attention
from reformer_rt.models.lsh import lsh_sort
from reformer_rt.models.presets import random_model
from reformer_rt.runtime import Session, streaming
from reformer_rt.runtime.artifacts import CACHE_ENV
from reformer_rt.runtime.streaming import STREAM_TOKENS_ENV, OnnxPieces, TorchArrays, stream_hidden

TOL = 1e-5  # the same float32 formulation; only the per-head sum of the output projection reorders additions
CONFIGS = {
    # crime-and-punishment's layout: local/LSH, 1 round, factorized buckets, causal, axial positions
    "crime": ReformerConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=48,
        attn_layers=("local", "lsh", "local", "lsh"), axial_pos_shape=(16, 32), axial_pos_embds_dim=(8, 24),
        max_position_embeddings=512, lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=1,
        num_buckets=(4, 8), hash_seed=7, is_decoder=True),
    # 4 rounds: the rounds' weights and a sorted piece that spans two rounds
    "rounds": ReformerConfig(
        vocab_size=258, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64,
        attn_layers=("lsh", "lsh"), axial_pos_shape=(8, 64), axial_pos_embds_dim=(16, 16),
        max_position_embeddings=512, lsh_attn_chunk_length=32, num_hashes=4, num_buckets=8, hash_seed=7,
        is_decoder=True),
    # encoder: not causal, look-ahead chunks wrapping at both ends, gelu, plain positions, 3 heads
    "encoder": ReformerConfig(
        vocab_size=50, hidden_size=24, num_attention_heads=3, attention_head_size=8, feed_forward_size=40,
        attn_layers=("lsh", "local", "lsh"), axial_pos_embds=False, max_position_embeddings=256,
        lsh_attn_chunk_length=8, local_attn_chunk_length=16, lsh_num_chunks_before=1, lsh_num_chunks_after=1,
        local_num_chunks_before=1, local_num_chunks_after=1, num_hashes=2, num_buckets=(2, 4), hash_seed=7,
        is_decoder=False, hidden_act="gelu"),
}


def _inputs(config: ReformerConfig, length: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(length).integers(0, config.vocab_size, length)
    mask = np.ones(length, dtype=np.int32)
    mask[length - padding:] = 0 if padding else 1
    return ids, mask


def _fused(model: ReformerModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.inference_mode(), fused_attention():
        return model(torch.from_numpy(ids)[None], torch.from_numpy(mask)[None])[0].numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length,padding", [(256, 0), (256, 37), (None, 5)])
def test_stream_hidden_equals_the_fused_forward(name: str, length: int | None, padding: int) -> None:
    config = CONFIGS[name]
    length = length or 3 * config.chunk_multiple  # three chunks: every piece touches both wrapped ends
    model = random_model(config, ReformerModel, seed=1)
    ids, mask = _inputs(config, length, padding)
    expected = _fused(model, ids, mask)
    for piece in (config.chunk_multiple, 2 * config.chunk_multiple, 1 << 15):
        got = np.concatenate([h for _, h in stream_hidden(TorchArrays(model), config, ids, mask, piece)])
        diff = np.abs(got - expected)[mask.astype(bool)].max()
        assert diff <= TOL, f"{name} L={length} piece {piece}: {diff}"


@pytest.mark.parametrize("num_buckets", [7, 65_535, 65_536])  # 16-bit buckets (the padding bucket too), then not
def test_sort_order_is_the_ops_sort(num_buckets: int) -> None:
    rng = np.random.default_rng(num_buckets)
    length = 4096
    buckets = rng.integers(0, min(num_buckets, 40) + 1, (3, length))  # many ties, some in the padding bucket
    buckets[buckets == min(num_buckets, 40)] = num_buckets
    held = np.empty_like(buckets, dtype=streaming._bucket_dtype(num_buckets))
    held[...] = buckets
    assert held.dtype == (np.uint16 if num_buckets < 65_536 else np.int64)
    expected = lsh_sort(torch.from_numpy(buckets)).numpy().ravel()
    np.testing.assert_array_equal(streaming._sort_order(held), expected)


def test_stream_hidden_refuses_lengths_the_pieces_cannot_cut() -> None:
    config = CONFIGS["crime"]
    model = random_model(config, ReformerModel, seed=1)
    for length in (16, 40):  # one chunk (full attention); not a chunk multiple
        with pytest.raises(ValueError, match="expected a multiple"):
            next(stream_hidden(TorchArrays(model), config, *_inputs(config, length, 0)))


@pytest.mark.parametrize("name", ["crime", "encoder"])
def test_onnx_pieces_equal_torch_pieces(name: str, tmp_path) -> None:
    from reformer_rt.export.pieces import export_pieces

    config = CONFIGS[name]
    model = random_model(config, ReformerLM, seed=2)
    manifest = export_pieces(model.reformer, model.lm_head, tmp_path)
    assert all(entry["max_abs_diff"] <= 1e-4 for entry in manifest["graphs"].values())
    ids, mask = _inputs(config, 256, 21)
    pieces = OnnxPieces(tmp_path, model)
    got = np.concatenate([h for _, h in stream_hidden(pieces, config, ids, mask, 64)])
    expected = np.concatenate([h for _, h in stream_hidden(TorchArrays(model), config, ids, mask, 64)])
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-4


OUTPUTS = ["logits", "last_logits", "log_probs", "top_k_ids", "last_hidden_state", "embedding"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The crime layout with one local and one LSH layer: a Session on ONNX Runtime exports it first (24 s on 2
    cores against 47 s with four layers); the driver's tests above run all four."""
    directory = tmp_path_factory.mktemp("stream") / "model"
    config = dataclasses.replace(CONFIGS["crime"], attn_layers=("local", "lsh"))
    random_model(config, ReformerLM, seed=3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export cache for the module: the checkpoint's whole-sequence export and its piece graphs, made once."""
    return tmp_path_factory.mktemp("stream-cache")


def _sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 64, n) for n in (300, 290, 17, 200, 301)]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_session_streams_long_rows_with_every_output_of_the_whole_path(backend, checkpoint, cache,
                                                                        monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(cache))
    seqs = _sequences()
    monkeypatch.setenv(STREAM_TOKENS_ENV, str(1 << 30))
    whole = Session(checkpoint, backend=backend).run(seqs, outputs=OUTPUTS, pooling="last")
    monkeypatch.setenv(STREAM_TOKENS_ENV, "64")
    session = Session(checkpoint, backend=backend)
    streamed = session.run(seqs, outputs=OUTPUTS, pooling="last")
    assert session._streamer() is not None
    for name in OUTPUTS:
        for i, seq in enumerate(seqs):
            got, expected = streamed.rows[name][i], whole.rows[name][i]
            assert got.shape == expected.shape, name
            assert np.abs(got.astype(np.float64) - expected).max() <= 2e-5, f"{backend} {name} sequence {i}"
    mean = session.run(seqs, outputs=["embedding"])["embedding"]
    for i, seq in enumerate(seqs):
        assert np.allclose(mean[i], whole.rows["last_hidden_state"][i].mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("stream", [True, False])
def test_out_receives_what_memory_would_hold(backend, stream, checkpoint, cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.setenv(STREAM_TOKENS_ENV, "64" if stream else str(1 << 30))
    session = Session(checkpoint, backend=backend)
    seqs = _sequences()
    in_memory = session.run(seqs, outputs=["logits", "log_probs"])
    shape = (len(seqs), max(len(s) for s in seqs), 64)
    mapped = np.lib.format.open_memmap(tmp_path / "logits.npy", mode="w+", dtype=np.float32, shape=shape)
    mapped[:] = 7.0  # stale content: padding positions must be cleared
    result = session.run(seqs, outputs=["logits", "log_probs"], out={"logits": mapped})
    assert result["logits"] is mapped
    mapped.flush()
    on_disk = np.load(tmp_path / "logits.npy")
    assert np.array_equal(on_disk, in_memory["logits"])
    assert all(np.array_equal(a, b) for a, b in zip(result.rows["log_probs"], in_memory.rows["log_probs"]))


def test_out_is_checked_before_the_run(checkpoint) -> None:
    session = Session(checkpoint, backend="torch")
    seqs = _sequences()
    good = np.zeros((len(seqs), 301, 64), dtype=np.float32)
    with pytest.raises(InputError, match="expected outputs asked for"):
        session.run(seqs, outputs=["log_probs"], out={"logits": good})
    with pytest.raises(InputError, match="shape"):
        session.run(seqs, outputs=["logits"], out={"logits": good[:, :300]})
    with pytest.raises(InputError, match="float32"):
        session.run(seqs, outputs=["logits"], out={"logits": good.astype(np.float64)})
