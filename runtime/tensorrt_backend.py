"""The TensorRT backend of ``Session``: a deserialized engine, one execution context, torch CUDA buffers.

``TensorRTBackend.open(path, kind, device)`` accepts an engine file written by ``reformer-rt build`` (its record
``MODEL.engine.json`` supplies the model config), a plugin-form ONNX export (built through the engine cache with the
default profile), or a checkpoint directory (exported to plugin-form ONNX in the cache directory first, once).
``run(input_ids, attention_mask)`` follows the ``Backend`` protocol of ``backends.py``; ``run_torch`` returns the CUDA
tensor instead of numpy.

Per call: input shapes are set on the context only when the batch shape changes, and the input/output buffers (torch
tensors whose addresses are bound with ``set_tensor_address``) are reused while it stays the same; the engine runs
with ``execute_async_v3`` on a dedicated torch stream (the default stream would add synchronizations), and the
caller's stream waits for it. Batches larger than the engine profile's maximum batch run in slices; a batch smaller
than its minimum is padded with copies of its last row (rows never see each other). Lengths outside the profile are
refused with the command that builds a wider engine.

This module imports without TensorRT: ``plugin_registered()`` answers False there, and ``open`` raises
``BackendUnavailable`` saying what to install.

Known limits: one profile, one context, not thread-safe (the Session calls it from one thread); engines are tied to
the TensorRT version and GPU architecture they were built with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reformer_rt.export.metadata import GRAPH_INPUTS, ExportInfo, export_info
from reformer_rt.models import InputError
from reformer_rt.models.lsh import OP_NAME, OP_NAMESPACE, PLUGIN_ATTRIBUTES, PLUGIN_VERSION_ATTR

from .artifacts import ARTIFACT_KINDS, cached_export
from .backends import check_outputs
from .engine_builder import BuildOptions, engine_for, import_plugin, import_tensorrt
from .engine_cache import EngineCache, EngineFileError, check_runtime_match, read_engine_file
from .engine_profiles import BatchLength, make_profile
from .hardware import gpu_info

if TYPE_CHECKING:  # imported for real in TensorRTBackend.__init__, after import_tensorrt() has checked it
    import tensorrt as trt

log = logging.getLogger("reformer_rt")


def plugin_registered() -> bool:
    """Whether TensorRT, a CUDA GPU and the LSHAttention plugin creator are all present. Never raises."""
    try:
        if not torch.cuda.is_available():
            return False
        trt = import_tensorrt()
        import_plugin()
        version = PLUGIN_ATTRIBUTES[PLUGIN_VERSION_ATTR]
        return trt.get_plugin_registry().get_creator(OP_NAME, version, OP_NAMESPACE) is not None
    except Exception:  # any failure means "not usable here"; callers only need the answer
        return False


class TensorRTBackend:
    name = "tensorrt"
    decoder = None  # an engine has no decoding step
    quantization = None  # engines are built from float exports

    def __init__(self, engine: bytes, record: dict[str, Any], device: str = "cuda") -> None:
        """Deserialize ``engine`` on ``device``; ``record`` is its build record (``engine_builder.make_record``)."""
        import_tensorrt()
        import_plugin()  # TensorRT calls back into the plugin's Python functions while the engine runs
        import tensorrt as trt

        gpu = gpu_info(device)
        self.device = torch.device("cuda", gpu.index)
        torch.cuda.set_device(self.device)  # TensorRT runs on the current device, in torch's primary context
        info = ExportInfo.parse(record["metadata"], where="engine record", fix="rebuild it with reformer-rt build")
        self.config, self.task, self.max_length = info.config, info.task.name, info.max_length
        self._graph_outputs = {raw.name: raw.exported_name for raw in info.task.graph}  # raw -> engine tensor
        self.record = record
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        deserialized: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(engine)
        if deserialized is None:
            raise EngineFileError("TensorRT could not deserialize the engine (its log above says why); rebuild it "
                                  "with reformer-rt build")
        self._engine = deserialized
        self._context: trt.IExecutionContext = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device)
        self._names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in self._names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(GRAPH_INPUTS) or not set(info.outputs) <= set(self._names):
            raise EngineFileError(f"engine tensors {self._names}; expected inputs {list(GRAPH_INPUTS)} and outputs "
                                  f"{list(info.outputs)} (an engine built by reformer-rt build)")
        low, _, high = self._engine.get_tensor_profile_shape(GRAPH_INPUTS[0], 0)
        self.min_shape, self.max_shape = BatchLength(low[0], low[1]), BatchLength(high[0], high[1])
        self._shape: tuple[int, int] | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def open(cls, path: Path, kind: str, device: str) -> TensorRTBackend:
        """An engine file, a plugin-form ONNX file or a checkpoint directory, ready to run on ``device``."""
        trt = import_tensorrt()
        import_plugin()
        gpu = gpu_info(device)
        if kind == "engine":
            engine, record = read_engine_file(Path(path))
            check_runtime_match(record, trt.__version__, gpu.compute_capability)
            return cls(engine, record, device)
        if kind not in ARTIFACT_KINDS:
            raise InputError(f"kind: got {kind!r}; expected one of {ARTIFACT_KINDS}")
        onnx_path = cached_export(Path(path), attention="plugin") if kind == "checkpoint" else Path(path)
        max_length = export_info(onnx_path, attention="plugin").max_length
        options = BuildOptions(make_profile(None, None, None, max_length))
        built = engine_for(onnx_path, options, EngineCache(), device, log=log.warning)
        return cls(built.engine, built.record, device)

    # --------------------------------------------------------------------------------------------- inference
    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self._graph_outputs)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """int64 [B, L] ids and mask -> ``{raw output: float32 array}`` for the requested engine outputs."""
        wanted = check_outputs(self, outputs)
        tensors = self.run_torch(input_ids, attention_mask)
        return {name: tensors[self._graph_outputs[name]].float().cpu().numpy() for name in wanted}

    def run_torch(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, torch.Tensor]:
        """Every engine output by its tensor name, as CUDA tensors (in the engine's output dtypes), ready on the
        current stream."""
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise InputError(f"input_ids / attention_mask: got shapes {ids.shape} / {mask.shape}; expected the "
                             "same [batch, length]")
        length = ids.shape[1]
        if not self.min_shape.length <= length <= self.max_shape.length:
            raise InputError(f"input length {length}: outside the engine's profile (lengths {self.min_shape.length}"
                             f"..{self.max_shape.length}); rebuild with reformer-rt build ... --max "
                             f"{self.max_shape.batch}x{max(length, self.max_shape.length)}")
        step = self.max_shape.batch
        parts = [self._execute(ids[i:i + step], mask[i:i + step]) for i in range(0, ids.shape[0], step)]
        return {name: torch.cat([part[name] for part in parts]) if len(parts) > 1 else parts[0][name]
                for name in parts[0]}

    def _execute(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
        rows = ids.shape[0]
        if rows < self.min_shape.batch:  # pad with copies of the last row; rows are independent
            extra = self.min_shape.batch - rows
            ids, mask = (np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) for a in (ids, mask))
        buffers = self._bind((ids.shape[0], ids.shape[1]))
        with torch.cuda.stream(self._stream):
            buffers[GRAPH_INPUTS[0]].copy_(torch.from_numpy(np.ascontiguousarray(ids)))
            buffers[GRAPH_INPUTS[1]].copy_(torch.from_numpy(np.ascontiguousarray(mask)))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
            # the buffers are reused by the next call
            result = {name: buffers[name][:rows].clone() for name in self._graph_outputs.values()}
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        for tensor in result.values():
            tensor.record_stream(current)
        return result

    def _bind(self, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Set input shapes and (re)allocate + bind every I/O buffer when the batch shape changes."""
        if shape == self._shape:
            return self._buffers
        self._stream.synchronize()  # nothing of the previous call may run while the context is reconfigured
        for name in GRAPH_INPUTS:
            if not self._context.set_input_shape(name, shape):
                raise InputError(f"input shape {shape}: rejected by the engine (profile {self.min_shape}.."
                                 f"{self.max_shape}); rebuild with reformer-rt build --min/--max")
        buffers = {}
        for name in self._names:
            resolved = self._context.get_tensor_shape(name)
            dims = tuple(resolved[i] for i in range(len(resolved)))
            if any(d < 0 for d in dims):
                raise RuntimeError(f"TensorRT left tensor {name!r} with unresolved shape {dims}")
            dtype = _torch_dtype(self._engine.get_tensor_dtype(name))
            with torch.cuda.stream(self._stream):  # owned by the stream that uses them
                buffers[name] = torch.empty(dims, dtype=dtype, device=self.device)
            self._context.set_tensor_address(name, buffers[name].data_ptr())
        self._shape, self._buffers = shape, buffers
        return buffers


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
             trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8}
    if dtype not in table:
        raise EngineFileError(f"engine tensor type {dtype}: not supported by this backend")
    return table[dtype]
