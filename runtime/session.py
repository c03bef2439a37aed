"""``Session``: one API over the TensorRT, ONNX Runtime and PyTorch backends, for ragged batches of long sequences.

    session = Session("model.onnx")                    # or a checkpoint directory, or a TensorRT engine
    out = session.run([[5, 7, 9], [4] * 70_000])       # {"logits": [N, L_max, V], "lengths": [N]}
    vectors = session.embed(sequences, pooling="mean") # [N, 2*hidden]

Contract (the batching rules are in ``batching.py``): a call takes N sequences and returns exactly one result
per sequence, in order, padded with zeros to the longest; each sequence's result equals what the model gives
for that sequence alone, whatever shares its batch. A rejected call raises one ``ReformerError`` naming the
sequence and the problem, and leaves the Session usable.

Backend choice (``backend="auto"``): TensorRT when a GPU, the ``tensorrt`` package and the plugin are all
present; else PyTorch on CUDA (Triton kernels) for a checkpoint; else ONNX Runtime (a checkpoint is exported to
a portable ONNX file once, into the cache directory). The choice and the reason are logged and kept in
``session.backend`` / ``session.backend_reason``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from reformer_rt.models import InputError, InputTypeError, ReformerLM, ReformerModel
from reformer_rt.models.checkpoint import CONFIG_FILE

from .backends import BackendUnavailable, OnnxRuntimeBackend, TorchBackend
from .batching import BatchPlan, plan_batches

log = logging.getLogger("reformer_rt")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
DEFAULT_MAX_TOKENS = 1 << 17
CACHE_ENV = "REFORMER_RT_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reformer-rt")


def artifact_kind(path: Path) -> str:
    """'checkpoint' (a directory), 'onnx' or 'engine' -- or a clear error."""
    if path.is_dir():
        if not (path / CONFIG_FILE).exists():
            raise InputError(f"{path}: a directory without {CONFIG_FILE}; expected a checkpoint directory")
        return "checkpoint"
    if not path.exists():
        raise InputError(f"{path}: does not exist; expected a checkpoint directory, an .onnx file or an engine")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix in (".engine", ".plan", ".trt"):
        return "engine"
    raise InputError(f"{path}: unknown kind of file; expected a checkpoint directory, *.onnx, or *.engine")


def tensorrt_ready() -> tuple[bool, str]:
    """Whether the TensorRT backend can run here, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    try:
        from .tensorrt_backend import plugin_registered
    except ImportError as exc:
        return False, str(exc)
    return (True, "GPU + tensorrt + plugin") if plugin_registered() else (False, "LSHAttention plugin not registered")


class Session:
    def __init__(self, path: str | Path, backend: str = "auto", device: str | None = None,
                 max_tokens_per_batch: int = DEFAULT_MAX_TOKENS, threads: int = 0, progress: bool = False) -> None:
        if backend not in BACKENDS:
            raise InputError(f"backend: got {backend!r}; expected one of {BACKENDS}")
        if max_tokens_per_batch < 1:
            raise InputError(f"max_tokens_per_batch: got {max_tokens_per_batch}; expected >= 1")
        self.path = Path(path)
        kind = artifact_kind(self.path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_tokens_per_batch = max_tokens_per_batch
        self.progress = progress
        name, self.backend_reason = self._choose(backend, kind)
        self._backend = self._open(name, kind, threads)
        self.backend = self._backend.name
        self.config = self._backend.config
        self.output_name = self._backend.output_name
        self.last_plan: BatchPlan | None = None
        log.info("reformer-rt: backend %s for %s (%s)", self.backend, self.path, self.backend_reason)

    # ------------------------------------------------------------------------------------------ backend choice
    def _choose(self, backend: str, kind: str) -> tuple[str, str]:
        if backend != "auto":
            return backend, "requested"
        if kind == "engine":
            return "tensorrt", "the model is a TensorRT engine"
        ready, why = tensorrt_ready()
        if ready:
            return "tensorrt", why
        if kind == "checkpoint" and self.device.startswith("cuda"):
            return "torch", f"TensorRT unavailable ({why}); PyTorch on CUDA runs the Triton kernels"
        return "onnxruntime", f"TensorRT unavailable ({why}); {'no CUDA' if self.device == 'cpu' else 'ONNX file'}"

    def _open(self, name: str, kind: str, threads: int):
        if name == "torch":
            if kind != "checkpoint":
                raise BackendUnavailable(f"backend torch: needs a checkpoint directory; got a {kind} file "
                                         f"{self.path} (use backend='onnxruntime' or 'tensorrt')")
            if threads:
                torch.set_num_threads(threads)
            return TorchBackend(_load_model(self.path), self.device)
        if name == "onnxruntime":
            if kind == "engine":
                raise BackendUnavailable(f"backend onnxruntime: {self.path} is a TensorRT engine")
            onnx_path = self.path if kind == "onnx" else exported_for(self.path, verbose=self.progress)
            return OnnxRuntimeBackend(onnx_path, self.device, threads)
        from .tensorrt_backend import TensorRTBackend  # ImportError inside says what to install

        return TensorRTBackend.open(self.path, kind, self.device)

    # ---------------------------------------------------------------------------------------------- inference
    def run(self, sequences: Any, attention_mask: Any = None) -> dict[str, np.ndarray]:
        """Outputs for N sequences: ``{output_name: [N, L_max, X] float32, "lengths": [N] int64}``."""
        seqs = self._normalize(sequences, attention_mask)
        outputs = self._execute(seqs, self._backend.run)
        return {self.output_name: _pad_stack(outputs), "lengths": np.array([len(s) for s in seqs])}

    def embed(self, sequences: Any, pooling: str = "mean", attention_mask: Any = None) -> np.ndarray:
        """One vector per sequence [N, 2*hidden]: mean over its tokens, or its last token's hidden state."""
        if pooling not in ("mean", "last"):
            raise InputError(f"pooling: got {pooling!r}; expected 'mean' or 'last'")
        if hasattr(self._backend, "hidden_states"):
            fn = self._backend.hidden_states
        elif self.output_name == "last_hidden_state":
            fn = self._backend.run
        else:
            raise InputError(f"embed: {self.path} only outputs {self.output_name}; export the encoder instead "
                             "(reformer-rt export ... --output hidden) or open the checkpoint with backend='torch'")
        states = self._execute(self._normalize(sequences, attention_mask), fn)
        return np.stack([s.mean(axis=0) if pooling == "mean" else s[-1] for s in states])

    def _execute(self, seqs: list[np.ndarray], fn) -> list[np.ndarray]:
        plan = plan_batches(self.config, [len(s) for s in seqs], self.max_tokens_per_batch)
        results: list[np.ndarray | None] = [None] * len(seqs)
        bar = tqdm(plan.batches, desc="micro-batches", unit="batch", disable=not self.progress or len(plan.batches) < 2)
        for batch in bar:
            ids = np.zeros((len(batch.indices), batch.length), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, index in enumerate(batch.indices):
                ids[row, :len(seqs[index])] = seqs[index]
                mask[row, :len(seqs[index])] = 1
            out = fn(ids, mask)
            for row, index in enumerate(batch.indices):
                results[index] = out[row, :len(seqs[index])]
        self.last_plan = plan
        return results  # type: ignore[return-value]

    def _normalize(self, sequences: Any, attention_mask: Any) -> list[np.ndarray]:
        seqs = _as_sequences(sequences, attention_mask)
        vocab, limit = self.config.vocab_size, self.max_length
        for i, seq in enumerate(seqs):
            if len(seq) == 0:
                raise InputError(f"sequence {i}: empty; expected at least one token")
            if len(seq) > limit or self.config.padded_length(len(seq)) > limit:
                raise InputError(f"sequence {i}: {len(seq):,} tokens; expected at most {limit:,} "
                                 "(the model's maximum length) -- split it; nothing is truncated silently")
            low, high = int(seq.min()), int(seq.max())
            if low < 0 or high >= vocab:
                raise InputError(f"sequence {i}: token id {low if low < 0 else high}; expected ids in "
                                 f"[0, {vocab - 1}]")
        return seqs

    @property
    def max_length(self) -> int:
        return int(getattr(self._backend, "max_length", self.config.max_position_embeddings))


def _as_sequences(sequences: Any, attention_mask: Any) -> list[np.ndarray]:
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.cpu().numpy()
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 2:
            raise InputError(f"sequences: got an array of shape {sequences.shape}; expected [N, L] or a list "
                             "of token-id lists")
        rows = [_as_ids(row, i) for i, row in enumerate(sequences)]
        if attention_mask is None:
            return rows
        mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
        if mask.shape != sequences.shape:
            raise InputError(f"attention_mask: got shape {mask.shape}; expected {sequences.shape}")
        lengths = mask.astype(bool).sum(axis=1)
        for i, (row, n) in enumerate(zip(mask.astype(bool), lengths)):
            if not row[:n].all():
                raise InputError(f"attention_mask row {i}: ones must come first (right padding); got a gap")
        return [row[:n] for row, n in zip(rows, lengths)]
    if attention_mask is not None:
        raise InputError("attention_mask: only valid with a 2-D array of sequences; a list is already ragged")
    if not isinstance(sequences, Sequence) or isinstance(sequences, (str, bytes)):
        raise InputTypeError(f"sequences: got {type(sequences).__name__}; expected a list of token-id lists "
                             "or a 2-D int array")
    if len(sequences) == 0:
        raise InputError("sequences: got an empty batch; expected at least one sequence")
    return [_as_ids(seq, i) for i, seq in enumerate(sequences)]


def _as_ids(seq: Any, index: int) -> np.ndarray:
    array = np.asarray(seq)
    if array.ndim != 1:
        raise InputError(f"sequence {index}: got shape {array.shape}; expected a flat list of token ids")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InputTypeError(f"sequence {index}: got dtype {array.dtype}; expected integer token ids")
    return array.astype(np.int64)


def _pad_stack(arrays: list[np.ndarray]) -> np.ndarray:
    longest = max(a.shape[0] for a in arrays)
    out = np.zeros((len(arrays), longest, arrays[0].shape[-1]), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return out


def _load_model(path: Path) -> ReformerLM | ReformerModel:
    from reformer_rt.export import load_source

    return load_source(path)


def exported_for(checkpoint: Path, attention: str = "portable", verbose: bool = False) -> Path:
    """An ONNX export of ``checkpoint`` in the given LSH form, made once and kept in the cache directory.

    The cache key covers the checkpoint's files and the package version (a new exporter re-exports)."""
    from reformer_rt.export import export_onnx
    from reformer_rt.export.metadata import package_version

    from .engine_builder import files_sha256  # imported here: engine_builder imports this module

    files = sorted(f for f in checkpoint.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"))
    digest = hashlib.sha256(f"{package_version()}:{files_sha256(files)}".encode()).hexdigest()
    target = cache_dir() / "onnx" / f"{digest[:24]}-{attention}.onnx"
    if not target.exists():
        log.info("reformer-rt: exporting %s to %s (%s form, once)", checkpoint, target, attention)
        target.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(checkpoint, target, attention=attention,
                    log=(lambda line: print(line, file=sys.stderr)) if verbose else log.info)
    return target
