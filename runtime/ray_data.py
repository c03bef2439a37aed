"""Offline batch jobs on Ray Data: embed (or score) a corpus of long documents with one Session per actor.

    import ray
    from reformer_rt.runtime.ray_data import embed_dataset

    docs = ray.data.read_binary_files("corpus/", include_paths=True)           # columns: bytes, path
    embedded = embed_dataset(docs, "models/demo", text_column="bytes", concurrency=2)  # 2 actors, 1 CPU each
    embedded.write_parquet("embeddings/")                                     # path, tokens, embedding

Steps: a stateless ``map_batches`` tokenizes each document with the model's tokenizer (UTF-8 decoded when the
column holds bytes) or takes an ``ids_column`` as is, and records its length bucket (``runtime/batching.py``);
the dataset is sorted by bucket, so a batch reaching an actor holds sequences of one or two buckets and padding
stays low; an actor pool (``concurrency`` actors, each one Session -- ``num_gpus=1`` per actor on CUDA) embeds
each batch with ``Session.embed``, which splits it by bucket again and keeps the batching contract, so every
embedding equals ``Session.embed`` of that document alone. Output rows keep every input column but the text and
add ``tokens`` and ``embedding`` (float32 list; ``pooling`` mean or last). Rows come out in bucket order.

Known limits: GPU actors have not been run by this project's tests, and several nodes only as two on one machine
(actors on both, ``tests/runtime/test_ray_cluster.py``); a document longer than the model's maximum length fails
the job with the Session's error (split documents first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reformer_rt.models import InputError

from .batching import DEFAULT_MAX_TOKENS

TOKENS, BUCKET, IDS, EMBEDDING = "tokens", "bucket", "input_ids", "embedding"


def _tokenize(batch: dict[str, np.ndarray], model_path: str, text_column: str | None,
              ids_column: str | None) -> dict[str, np.ndarray]:
    """Stateless, per batch: text (or ids) -> ``input_ids``, ``tokens``, ``bucket``; other columns kept."""
    from .batching import bucket_length
    from .tokenizers import load_tokenizer

    config = _config(Path(model_path))
    if text_column is not None:
        tokenizer = load_tokenizer(Path(model_path), config)
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch[text_column]]
        ids = [np.asarray(tokenizer.encode(text), dtype=np.int64) for text in texts]
    else:
        ids = [np.asarray(row, dtype=np.int64) for row in batch[ids_column]]
    out = {name: values for name, values in batch.items() if name not in (text_column, ids_column)}
    out[IDS] = _object_array(ids)
    out[TOKENS] = np.array([len(row) for row in ids], dtype=np.int64)
    out[BUCKET] = np.array([bucket_length(config, max(1, len(row))) for row in ids], dtype=np.int64)
    return out


class _Embed:
    """One Session per actor, opened once; each batch -> ``embedding``."""

    def __init__(self, model_path: str, backend: str, device: str | None, pooling: str,
                 max_tokens_per_batch: int, threads: int) -> None:
        from .session import Session

        self.session = Session(model_path, backend=backend, device=device, threads=threads,
                               max_tokens_per_batch=max_tokens_per_batch)
        self.pooling = pooling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.session.embed(list(batch[IDS]), pooling=self.pooling)
        out = {name: values for name, values in batch.items() if name not in (IDS, BUCKET)}
        out[EMBEDDING] = _object_array([v.astype(np.float32) for v in vectors])
        return out


def _object_array(rows: list[np.ndarray]) -> np.ndarray:
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array


def _config(path: Path) -> Any:
    from reformer_rt.models import ReformerConfig
    from reformer_rt.models.checkpoint import CONFIG_FILE

    if not (path / CONFIG_FILE).is_file():
        raise InputError(f"{path}: expected a checkpoint directory (config.json + weights); ray_data tokenizes "
                         "with the checkpoint's tokenizer and runs it on the torch or onnxruntime backend")
    return ReformerConfig.from_json_file(path / CONFIG_FILE)


def embed_dataset(dataset: Any, model_path: str | Path, text_column: str | None = None,
                  ids_column: str | None = None, pooling: str = "mean", backend: str = "auto",
                  device: str | None = None, concurrency: int = 1, num_gpus: float = 0, threads: int = 1,
                  num_cpus: float | None = None, batch_size: int = 16,
                  max_tokens_per_batch: int = DEFAULT_MAX_TOKENS) -> Any:
    """``dataset`` (a ``ray.data.Dataset``) with ``tokens`` and ``embedding`` per row (see the module docstring).
    Give either ``text_column`` (str or UTF-8 bytes) or ``ids_column`` (token-id lists). Each actor reserves
    ``num_cpus`` (default: ``threads``) and ``num_gpus``; leave the cluster a CPU for the write that follows."""
    if (text_column is None) == (ids_column is None):
        raise InputError(f"embed_dataset: got text_column={text_column!r}, ids_column={ids_column!r}; expected "
                         "exactly one of them")
    if pooling not in ("mean", "last"):
        raise InputError(f"pooling: got {pooling!r}; expected 'mean' or 'last'")
    if concurrency < 1 or batch_size < 1:
        raise InputError(f"concurrency / batch_size: got {concurrency} / {batch_size}; expected >= 1")
    path = str(Path(model_path).absolute())
    _config(Path(path))
    tokenized = dataset.map_batches(_tokenize, fn_kwargs={"model_path": path, "text_column": text_column,
                                                          "ids_column": ids_column}, batch_format="numpy")
    # Sorted to the end before the actors start: a pool that holds every CPU would starve the read and the sort.
    ordered = tokenized.sort(BUCKET).materialize()
    return ordered.map_batches(
        _Embed, fn_constructor_kwargs={"model_path": path, "backend": backend, "device": device, "pooling": pooling,
                                       "max_tokens_per_batch": max_tokens_per_batch, "threads": threads},
        batch_size=batch_size, batch_format="numpy", concurrency=concurrency, num_gpus=num_gpus,
        num_cpus=threads if num_cpus is None else num_cpus)
