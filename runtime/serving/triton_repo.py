"""A Triton Inference Server model repository for a reformer-rt model: ``reformer-rt export MODEL --triton-repo DIR``.

Two layouts (``--triton-backend``):

* ``python`` (default; any artifact): ``NAME/config.pbtxt`` (backend "python", Triton's dynamic batcher collecting
  requests, ragged inputs allowed), ``NAME/1/model.py`` (``reformer_rt.runtime.serving.triton_python``: a Session
  over the artifact; batching by the length-bucket contract inside) and ``NAME/1/artifact`` (a copy of the
  checkpoint directory, ONNX file or engine + record). An int8 export runs in int8 as it is; a checkpoint with
  ``--quantize int8`` carries the parameter ``reformer_rt_quantize`` and its Session quantizes. Inputs, outputs, datatypes and dims are exactly those of
  ``reformer-rt serve`` (``ServedModel.config``). Triton's Python environment needs reformer-rt installed.
* ``onnxruntime``: ``NAME/1/model.onnx`` (the portable export) for Triton's onnxruntime backend, no Python at
  serving time: ``input_ids`` and ``attention_mask`` INT64 ``[-1]`` per sequence, the export's one output. Triton
  runs each request as given, so the rows of one request share one padded length and are NOT batch-invariant
  (HF's LSH attention depends on the padded length): send one sequence per request, or use the Python layout.
  An int8 export (or a checkpoint exported here with ``--quantize int8``) holds standard ops only
  (``MatMulInteger``, ``DynamicQuantizeLinear``), which that backend runs.

A TensorRT engine cannot go to Triton's tensorrt backend: its LSHAttention plugin is defined in Python
(``tensorrt.plugin``), and that backend loads plugins only as C++ shared libraries
(``--backend-config=tensorrt,plugins=...`` or ``LD_PRELOAD``) -- so an engine is served through the Python layout,
where the plugin registers itself when the Session opens the engine.

``config.pbtxt`` is built as Triton's ``ModelConfig`` protobuf message (from tritonclient's generated classes),
written with protobuf's text format and parsed back against the same schema before the repository is moved into
place; the repository appears complete or not at all.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from reformer_rt.export.metadata import Quantization
from reformer_rt.models import InputError

from ..artifacts import artifact_kind, external_data_files

TRITON_BACKENDS = ("python", "onnxruntime")
VERSION = "1"
ARTIFACT = "artifact"
MODEL_PY = '''"""Triton Python backend for a reformer-rt model (written by reformer-rt export --triton-repo)."""

from reformer_rt.runtime.serving.triton_python import TritonPythonModel  # noqa: F401
'''
DEFAULT_QUEUE_DELAY_US = 2000


def _config_pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise InputError(f"--triton-repo needs tritonclient for Triton's ModelConfig schema ({exc}): pip install "
                         "\"reformer-rt[serve]\"") from exc
    return model_config_pb2


def python_config(name: str, source: Path, backend: str, device: str | None, queue_delay_us: int,
                  quantize: str | None = None) -> Any:
    """The Python-backend ``ModelConfig``: the served model's own interface, opened once here to describe it."""
    from .model import ServedModel
    from .spec import ModelSpec
    from .triton_python import ARTIFACT_PARAMETER, BACKEND_PARAMETER, QUANTIZE_PARAMETER

    pb = _config_pb()
    session = ModelSpec(name, str(source), backend, "cpu" if backend != "tensorrt" else None,
                        quantize=quantize).open()
    config = ServedModel(name, session).config()
    config.backend = "python"
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    kind = {"cpu": pb.ModelInstanceGroup.KIND_CPU, "cuda": pb.ModelInstanceGroup.KIND_GPU}.get(
        (device or "").split(":")[0], pb.ModelInstanceGroup.KIND_AUTO)
    config.instance_group.add(kind=kind, count=1)
    del config.parameters["reformer_rt_backend"]
    config.parameters[ARTIFACT_PARAMETER].string_value = ARTIFACT + (source.suffix if source.is_file() else "")
    config.parameters[BACKEND_PARAMETER].string_value = session.backend
    if quantize is not None and source.is_dir():  # an export carries its own quantization
        config.parameters[QUANTIZE_PARAMETER].string_value = quantize
    return config


def onnxruntime_config(name: str, onnx_path: Path) -> Any:
    """The onnxruntime-backend ``ModelConfig`` of a portable export: its graph outputs, per-sequence dims."""
    from reformer_rt.export.metadata import GRAPH_INPUTS, export_info

    from .model import MAX_SEQUENCES_PER_REQUEST

    pb = _config_pb()
    info = export_info(onnx_path, attention="portable")
    config = pb.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=MAX_SEQUENCES_PER_REQUEST)
    for graph_input in GRAPH_INPUTS:
        config.input.add(name=graph_input, data_type=pb.DataType.TYPE_INT64, dims=[-1])
    for raw in info.task.graph:
        width = raw.size(info.config)
        dims = ([-1] if raw.per_position else []) + ([width] if width is not None else [])
        config.output.add(name=raw.exported_name, data_type=pb.DataType.TYPE_FP32, dims=dims)
    return config


def validate_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text against Triton's ``ModelConfig`` schema (unknown fields or bad values raise)."""
    from google.protobuf import text_format

    pb = _config_pb()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise InputError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from exc


def _copy_artifact(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
        return
    shutil.copy2(source, target)
    if source.suffix == ".onnx":
        for data in external_data_files(source):  # weights of a graph over 2 GB live beside it
            shutil.copy2(data, target.parent / data.name)
    else:
        record = source.with_name(source.name + ".json")
        shutil.copy2(record, target.with_name(target.name + ".json"))


def write_repository(source: Path, repository: Path, name: str | None = None, triton_backend: str = "python",
                     backend: str | None = None, device: str | None = None,
                     queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, export_options: dict[str, Any] | None = None,
                     log: Any = print) -> Path:
    """``repository/NAME`` for ``source`` (checkpoint directory, ONNX file or engine); returns that directory.
    ``export_options`` (``export_onnx``'s dtype, max_length, opset, validate, quantize, quality) apply where a
    checkpoint is exported for the onnxruntime layout; their ``quantize`` also makes a checkpoint's Session quantize
    in the python layout."""
    from google.protobuf import text_format

    source = Path(source)
    kind = artifact_kind(source)
    if triton_backend not in TRITON_BACKENDS:
        raise InputError(f"--triton-backend: got {triton_backend!r}; expected one of {TRITON_BACKENDS} (an engine "
                         "goes through the python backend: see reformer_rt.runtime.serving.triton_repo)")
    if triton_backend == "onnxruntime" and kind == "engine":
        raise InputError(f"{source}: a TensorRT engine cannot run on Triton's onnxruntime backend; use "
                         "--triton-backend python")
    name = name or source.stem or source.name
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"--name: got {name!r}; expected a model name without '/' (Triton's directory name)")
    target = repository / name
    if target.exists():
        raise InputError(f"{target}: exists; remove it or choose another --name")
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        version = staging / VERSION
        version.mkdir()
        if triton_backend == "python":
            default = {"checkpoint": "torch", "onnx": "onnxruntime", "engine": "tensorrt"}[kind]
            quantization = (export_options or {}).get("quantize")
            config = python_config(name, source, backend or default, device, queue_delay_us,
                                   None if quantization is None else Quantization.of(quantization).scheme)
            _copy_artifact(source, version / config.parameters["reformer_rt_artifact"].string_value)
            (version / "model.py").write_text(MODEL_PY)
        else:
            onnx_path = version / "model.onnx"
            if kind == "checkpoint":
                from reformer_rt.export import export_onnx

                export_onnx(source, onnx_path, attention="portable", log=log, **(export_options or {}))
            else:
                _copy_artifact(source, onnx_path)
            config = onnxruntime_config(name, onnx_path)
        text = text_format.MessageToString(config)
        if validate_config(text) != config:
            raise AssertionError("config.pbtxt does not round-trip through ModelConfig")
        (staging / "config.pbtxt").write_text(text)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
