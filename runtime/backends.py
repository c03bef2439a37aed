"""Execution backends behind ``Session``: each runs ONE micro-batch of equally padded sequences.

The interface is the ``Backend`` protocol: ``run(input_ids, attention_mask, outputs) -> {name: numpy array}`` with
int64 [B, L] inputs (the Session pads; a batch never mixes length buckets), for the raw outputs it lists in
``outputs`` (rows of the task table, ``reformer_rt.models.heads.TASKS``: per position [B, L, ...] or per sequence
[B, ...]), plus ``name``, ``config``, ``task`` (the model's: lm, base, classification, question_answering),
``max_length`` and ``decoder``. A backend declares what it can do -- the task and raw outputs it computes, and
whether it can decode (cached generation: ``decoder``) -- and callers read that, never its type or name. Batching,
bucketing and derived outputs (last-position logits, pooling, probabilities, ...) live in the Session only.

* ``TorchBackend`` runs the PyTorch model (the LSH op uses the Triton kernels on CUDA; on CPU both attention
  layers run fused, ``models/fused.py``); it gives every raw output of its task's row -- the head's, any extra
  ones, and the last hidden state -- from one forward pass. With a ``Quantization`` its Linear layers run in int8
  on CPU (``quantize_linear_layers``). Kernels forced where it is made (``forced_kernels``,
  else ``REFORMER_RT_KERNELS``, read then) stay its own: the threads that run it later (a server's workers) run
  them too.
* ``OnnxRuntimeBackend`` runs a portable-form ONNX file (CUDAExecutionProvider when onnxruntime-gpu is installed
  and a CUDA device is asked for, else CPU); it gives the outputs the file was exported with, in the precision it
  was exported with (an int8 export says so in its metadata: ``quantization``).
* The TensorRT backend lives in ``tensorrt_backend.py`` (imported only when asked for).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from reformer_rt.export.metadata import GRAPH_INPUTS, Quantization
from reformer_rt.models import InputError, Reformer, ReformerConfig, ReformerModel, task_of
from reformer_rt.models.attention import LSHSelfAttention
from reformer_rt.models.fused import fused_attention
from reformer_rt.models.lsh_op import KERNELS_ENV, forced_kernels, kernels_forced, parse_kernels
from reformer_rt.models.modeling import FeedForward, LMHead

from .errors import BackendFailed, BackendUnavailable

#: Sequence positions per feed-forward / LM-head slice when a checkpoint leaves chunking off: bounds those
#: activations at long lengths; per-position math, so the results do not change.
FEED_FORWARD_CHUNK = 8192
#: ONNX Runtime's CPU memory arena keeps freed intermediates for reuse: faster (~35 % at 64K tokens, no page faults)
#: at about the same peak once memory patterns are off (1.64 vs 1.67 GB at 64K, crime-and-punishment architecture;
#: with patterns on it was 3.1 GB). Batches above this many tokens run in a second session without the arena, whose
#: peak is the live set alone, so the longest inputs (524,288 tokens) fit in memory.
LEAN_TOKENS = 1 << 17


@dataclasses.dataclass(frozen=True)
class Decoder:
    """What cached decoding needs from a backend that can decode: the PyTorch model (``check_decoder`` says whether
    it is a causal LM) and the LSH kernels its forward passes run (``lsh_op.forced_kernels``; None: by device)."""

    model: Reformer
    kernels: str | None


class Backend(Protocol):
    name: str
    config: ReformerConfig
    task: str  # the model's task (its row of ``reformer_rt.models.heads.TASKS``)
    max_length: int  # the longest sequence it accepts
    #: What cached decoding steps through (``generation.py``), or None: an exported graph has no decoding step
    #: (it would need every layer's cache as inputs and outputs).
    decoder: Decoder | None
    quantization: Quantization | None  # how its weight products are quantized; None: float

    @property
    def outputs(self) -> tuple[str, ...]:
        """The raw outputs ``run`` can compute, primary first."""
        ...

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """One micro-batch: int64 [B, L] ids and mask -> {name: float32 array} for each requested raw output."""
        ...


def check_outputs(backend: Backend, outputs: Sequence[str] | None) -> tuple[str, ...]:
    """The raw outputs to compute (default: the primary one), or an error naming what ``backend`` gives."""
    wanted = backend.outputs[:1] if outputs is None else tuple(outputs)
    missing = [name for name in wanted if name not in backend.outputs]
    if missing:
        raise InputError(f"outputs: got {missing}; the {backend.name} backend gives {list(backend.outputs)} for this "
                         "model (an ONNX file or engine holds only the output it was exported with; open the "
                         "checkpoint directory with backend='torch' for both)")
    return wanted


#: Set to 0 to keep glibc's default allocation policy for the torch backend on CPU (``reuse_freed_memory``).
HEAP_REUSE_ENV = "REFORMER_RT_HEAP_REUSE"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>


def reuse_freed_memory() -> bool:
    """Have glibc serve every allocation from its heap and keep freed memory for reuse (``mallopt``), as ONNX
    Runtime's arena does for its tensors; returns whether it did.

    By default glibc maps each block over 32 MB afresh and unmaps it when freed, so every large activation of a
    long sequence is new memory the kernel must fault in and zero: the torch backend spent half of a 65,536-token
    forward pass doing that (11.4 s vs 5.5 s, crime-and-punishment architecture, 2 cores). The cost: the process
    keeps its high-water mark of memory after a run instead of returning it. One arena for every thread: with one
    per thread, blocks freed by one thread were not reused by another (64K tokens: 1.99 GB peak vs 1.66 GB with
    one, transformers 1.83 GB). Linux with glibc only; process-wide; ``REFORMER_RT_HEAP_REUSE=0`` opts out."""
    import ctypes
    import platform

    if os.environ.get(HEAP_REUSE_ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))


#: torch's quantized engines for x86, in order of preference ("x86" dispatches to fbgemm and oneDNN by shape).
QUANTIZED_ENGINES = ("x86", "fbgemm")


def quantize_linear_layers(model: Reformer, quantization: Quantization) -> tuple[Reformer, Quantization]:
    """``model`` (changed in place) with its Linear layers in int8, and ``quantization`` completed with the number
    of layers quantized and the tool: torch's dynamic quantization (``torch.ao.quantization.
    quantize_dynamic``; int8 weights with one scale per output channel, activations quantized per tensor at run
    time; CPU only), on the x86 / fbgemm engine. The LSH layers' shared query/key projections stay float when
    ``quantization.fp32`` names "query_key"; the hashing rotation product is a matmul, not a Linear layer, and
    stays float here whatever is asked. Process-wide: sets torch's quantized engine.

    torch 2.13 still ships ``torch.ao.quantization.quantize_dynamic`` but marks it deprecated in favour of torchao;
    its warnings are silenced here (they would print on every Session)."""
    engine = next((e for e in QUANTIZED_ENGINES if e in torch.backends.quantized.supported_engines), None)
    if engine is None:
        raise BackendUnavailable(f"quantize int8 on the torch backend: needs the x86 / fbgemm quantized engine; this "
                                 f"torch has {torch.backends.quantized.supported_engines} -- use the onnxruntime "
                                 "backend")
    torch.backends.quantized.engine = engine
    kept = {id(layer.query_key) for layer in model.modules() if isinstance(layer, LSHSelfAttention)} \
        if "query_key" in quantization.fp32 else set()
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    layers = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and id(module) not in kept}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized = quantize_dynamic(model, layers, dtype=torch.qint8, inplace=True)
    tool = f"torch.ao.quantization.quantize_dynamic {torch.__version__} ({engine})"
    return quantized, dataclasses.replace(quantization, products=len(layers), tool=tool)


class TorchBackend:
    name = "torch"

    def __init__(self, model: Reformer, device: str = "cpu", dtype: str = "float32",
                 quantization: Quantization | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.model = model.to(self.device, getattr(torch, dtype)).eval()
        if quantization is not None:
            if self.device.type != "cpu" or dtype != "float32":
                raise BackendUnavailable(f"quantize int8 on the torch backend: runs on CPU from float32 weights; got "
                                         f"device {self.device}, dtype {dtype}")
            self.model, quantization = quantize_linear_layers(self.model, quantization)
        self.quantization = quantization
        for module in self.model.modules():
            if isinstance(module, (FeedForward, LMHead)) and module.chunk == 0:
                module.chunk = FEED_FORWARD_CHUNK
        self.config: ReformerConfig = model.config
        self.max_length = self.config.max_position_embeddings
        #: The LSH kernels its forward passes force (the module docstring).
        self.kernels = kernels_forced() or parse_kernels(os.environ.get(KERNELS_ENV))
        self.decoder: Decoder | None = Decoder(self.model, self.kernels)
        self._task = task_of(model)
        self.task = self._task.name
        self._body = self.model if isinstance(self.model, ReformerModel) else self.model.reformer

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(raw.name for raw in self._task.raw_outputs)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        wanted = check_outputs(self, outputs)
        with torch.inference_mode(), fused_attention(self.device.type == "cpu"), forced_kernels(self.kernels):
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            hidden = self._body(ids, mask)  # [B, L, 2*hidden]
            # each head runs only when one of its outputs is wanted
            return {raw.name: raw.compute(self.model, hidden, mask).float().cpu().numpy()
                    for raw in self._task.raw_outputs if raw.name in wanted}


class OnnxRuntimeBackend:
    name = "onnxruntime"
    decoder = None

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("backend onnxruntime: not installed; pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA)") from exc
        from reformer_rt.export import export_info

        info = export_info(path, attention="portable")
        self.config, self.task, self.max_length = info.config, info.task.name, info.max_length
        self.quantization = info.quantization
        self._graph_outputs = {raw.name: raw.exported_name for raw in info.task.graph}  # raw -> graph name
        self._providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("backend onnxruntime on CUDA: CUDAExecutionProvider is missing; "
                                         "pip install onnxruntime-gpu (reformer-rt doctor says what is installed)")
            self._providers.insert(0, "CUDAExecutionProvider")
        self._path, self._threads = path, threads
        self.session = self._open(arena=True)
        self._lean_session = None  # opened on the first batch over LEAN_TOKENS
        self.providers = self.session.get_providers()

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self._graph_outputs)

    def _open(self, arena: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: exporter leftovers trigger harmless warnings
        options.enable_cpu_mem_arena = arena
        # Memory patterns pre-plan one block per input shape: with a dynamic length that is a second copy of the
        # activations (64K tokens, crime-and-punishment: 3.1 GB peak with, 1.6 GB without) and no faster.
        options.enable_mem_pattern = False
        if self._threads:
            options.intra_op_num_threads = self._threads
        try:
            return ort.InferenceSession(str(self._path), options, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BackendUnavailable(f"{self._path}: ONNX Runtime cannot load it ({exc})") from exc

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        wanted = check_outputs(self, outputs)
        feeds = dict(zip(GRAPH_INPUTS, (input_ids, attention_mask)))
        session = self.session
        if input_ids.size > LEAN_TOKENS:
            if self._lean_session is None:
                self._lean_session = self._open(arena=False)
            session = self._lean_session
        try:
            got = session.run([self._graph_outputs[name] for name in wanted], feeds)
        except Exception as exc:  # onnxruntime's own exception types: a damaged or foreign graph, or memory
            raise BackendFailed(f"{self._path}: ONNX Runtime failed running it on a {input_ids.shape[0]} x "
                                f"{input_ids.shape[1]} batch ({type(exc).__name__}: {exc}); if the file was edited "
                                "or damaged, export it again") from exc
        return {name: array.astype(np.float32, copy=False) for name, array in zip(wanted, got)}
