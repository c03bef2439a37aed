"""Execution backends behind ``Session``: each runs ONE micro-batch of equally padded sequences.

The interface is deliberately small: ``run(input_ids, attention_mask) -> numpy array [B, L, X]`` with int64
[B, L] inputs whose length is already a chunk multiple (the Session pads), plus ``config``, ``output_name``
(``logits`` or ``last_hidden_state``) and ``name``. Batching, bucketing and chunking live in the Session only.

* ``TorchBackend`` runs the PyTorch model (the LSH op uses the Triton kernels on CUDA, the reference on CPU).
* ``OnnxRuntimeBackend`` runs a portable-form ONNX file (CUDAExecutionProvider when onnxruntime-gpu is installed
  and a CUDA device is asked for, else CPU). Plugin-form files need TensorRT and are refused with that reason.
* The TensorRT backend lives in ``tensorrt_backend.py`` (imported only when asked for).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reformer_rt.models import ReformerConfig, ReformerError, ReformerLM, ReformerModel
from reformer_rt.models.modeling import FeedForward, LMHead

#: Sequence positions per feed-forward / LM-head slice when a checkpoint leaves chunking off: bounds those
#: activations at long lengths; per-position math, so the results do not change.
FEED_FORWARD_CHUNK = 8192
#: ONNX Runtime's CPU memory arena keeps freed intermediates for reuse: faster (~20 % at 16K-64K tokens) but about
#: twice the peak memory (4.2 vs 2.1 GB at 64K, crime-and-punishment architecture). Batches above this many tokens
#: run in a second session without the arena, so the longest inputs (524,288 tokens) fit in memory.
LEAN_TOKENS = 1 << 17


class BackendUnavailable(ReformerError):
    """The requested backend cannot run here (library missing, no GPU, wrong artifact); says what to install."""


class TorchBackend:
    name = "torch"

    def __init__(self, model: ReformerLM | ReformerModel, device: str = "cpu") -> None:
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise BackendUnavailable(f"device: got {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r}: torch sees no CUDA GPU (torch {torch.__version__})")
        self.model = model.to(self.device).eval()
        for module in self.model.modules():
            if isinstance(module, (FeedForward, LMHead)) and module.chunk == 0:
                module.chunk = FEED_FORWARD_CHUNK
        self.config: ReformerConfig = model.config
        self.output_name = "logits" if isinstance(model, ReformerLM) else "last_hidden_state"

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            return self.model(ids, mask).float().cpu().numpy()

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        body = self.model.reformer if isinstance(self.model, ReformerLM) else self.model
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            return body(ids, mask).float().cpu().numpy()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("backend onnxruntime: not installed; pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA)") from exc
        from reformer_rt.export import read_metadata

        try:
            meta = read_metadata(path)
        except Exception as exc:  # onnx raises protobuf DecodeError and others for a corrupt file
            raise BackendUnavailable(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
        if "config" not in meta:
            raise BackendUnavailable(f"{path}: no reformer_rt metadata; expected a file written by "
                                     "`reformer-rt export`")
        options = meta["export_options"]
        if options.get("attention") != "portable":
            raise BackendUnavailable(f"{path}: attention={options.get('attention')!r} (LSHAttention plugin nodes) "
                                     "runs on TensorRT only; export with --attention portable for ONNX Runtime")
        self.config = ReformerConfig.from_dict(meta["config"])
        self.output_name = options["output_name"]
        self.max_length = int(options["max_length"])
        self._providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("backend onnxruntime on CUDA: CUDAExecutionProvider is missing; "
                                         "pip install onnxruntime-gpu")
            self._providers.insert(0, "CUDAExecutionProvider")
        self._path, self._threads = path, threads
        self.session = self._open(arena=True)
        self._lean_session = None  # opened on the first batch over LEAN_TOKENS
        self.providers = self.session.get_providers()

    def _open(self, arena: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: exporter leftovers trigger harmless warnings
        options.enable_cpu_mem_arena = arena
        if self._threads:
            options.intra_op_num_threads = self._threads
        try:
            return ort.InferenceSession(str(self._path), options, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BackendUnavailable(f"{self._path}: ONNX Runtime cannot load it ({exc})") from exc

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        session = self.session
        if input_ids.size > LEAN_TOKENS:
            if self._lean_session is None:
                self._lean_session = self._open(arena=False)
            session = self._lean_session
        out = session.run([self.output_name], feeds)[0]
        return out.astype(np.float32, copy=False)
