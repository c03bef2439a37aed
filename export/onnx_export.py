"""``export_onnx``: a Reformer checkpoint or model -> one validated ONNX file, written atomically.

Steps: load the model (HF or reformer-rt checkpoint directory, or a model object) -> trace it with the chosen
LSH lowering (``lowering.py``) -> float16 precision pass (``precision.py``) -> metadata (``metadata.py``) -> save
into a temporary directory next to the target -> ``onnx.checker`` -> validate against PyTorch in ONNX Runtime
(``validate.py``) -> move into place. With ``quantize="int8"`` (portable, float32 graphs of language models) the
float graph is validated first, then its weight products are quantized (``quantize.py``) and the int8 graph is
validated by task metrics on text instead of a largest difference (``quality.py``). Options and the output path
are checked before any work. Any failure or interrupt removes the temporary files, so the target is either the
complete new file or untouched. Graphs over 2 GB are saved with external data (``<name>.data`` beside the file).

The default LSH form is ``portable``: it runs wherever ONNX Runtime does, so a first export always runs on the
machine that made it; the ``plugin`` form is for TensorRT (``reformer-rt build``) and runs nowhere else.

Known limits: see ``lowering.py`` (length range, unchunked feed-forward) and ``validate.py`` (float16 on CPU).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch import nn

from reformer_rt.models import CheckpointError, Reformer, load_pretrained, task_of
from reformer_rt.models.heads import TASKS
from reformer_rt.models.errors import os_error_hint, raise_if_stopped
from reformer_rt.models.lsh import ONNX_DOMAIN, OP_NAME, OP_VERSION
from reformer_rt.models.lsh_op import ONNX_LOWERINGS

from . import lowering, metadata, precision
from . import validate as validation
from .errors import ExportError, ValidationError
from .metadata import Quantization
from .quality import QualityCheck, QualityResult, check_quantized
from .quantize import hashing_nodes, quantize_int8

DEFAULT_OPSET = 18
#: Opsets the exporter writes as asked: torch's ONNX exporter builds opset 18 and onnxscript's version converter
#: moves it to 18..25; outside that range torch silently keeps 18.
MIN_OPSET, MAX_OPSET = 18, 25
DEFAULT_ATTENTION = "portable"
EXTERNAL_DATA_BYTES = 2**31 - 2**24  # protobuf's 2 GB limit, with room for the graph itself


@dataclasses.dataclass(frozen=True)
class ExportReport:
    path: Path
    attention: str
    dtype: str
    opset: int
    output_names: tuple[str, ...]
    max_length: int
    lsh_nodes: int
    size_bytes: int
    external_data: bool
    export_seconds: float
    validation: validation.ValidationResult | None  # of the float graph (before quantization, for an int8 export)
    quantization: Quantization | None = None
    quality: QualityResult | None = None  # the int8 graph's task metrics against the float model

    def summary(self) -> str:
        int8 = "" if self.quantization is None else (f", int8: {self.quantization.products} weight products, float: "
                                                     f"{', '.join(self.quantization.fp32) or 'nothing'}")
        line = (f"exported {self.path} ({self.attention}, {self.dtype}{int8}, opset {self.opset}, "
                f"{self.size_bytes / 2**20:.2f} MiB, {self.export_seconds:.1f} s)")
        result = self.validation
        if result is None:
            return line + "; validation skipped"
        if not result.ran:
            return line + f"; validation not run: {result.note}"
        line += (f"; {'float graph ' if self.quantization else ''}validated on {len(result.cases)} input shapes: max "
                 f"{result.metric} diff {result.max_diff:.3g} (tolerance {result.tolerance:g})")
        return line + ("" if self.quality is None else f"; int8 graph: {self.quality.summary()}")


def export_onnx(source: str | Path | nn.Module, path: str | Path, attention: str = DEFAULT_ATTENTION,
                dtype: str = "float32", max_length: int | None = None, opset: int = DEFAULT_OPSET,
                validate: bool = True, log: Callable[[str], None] | None = print,
                quantize: str | Quantization | None = None, quality: QualityCheck = QualityCheck()) -> ExportReport:
    """Export ``source`` to ``path`` (see the module docstring); returns what was written and measured.
    ``quantize``: None (float), "int8" or a ``Quantization`` (which hashing parts stay float); ``quality``: the
    text and the limit an int8 graph is validated with."""
    quantization = Quantization.of(quantize)
    _check_options(attention, dtype, opset, quantization)
    target = _check_target(Path(path))
    start = time.perf_counter()
    model = load_source(source, max_length)
    if quantization is not None and task_of(model).name != "lm":
        raise ExportError(f"quantize: got a {task_of(model).name} model; int8 export is for language models (its "
                          "validation measures bits per token on text) -- export this model in float32")
    low, high = lowering.length_range(model, max_length)
    tmp = _temp_dir(target)
    result = quality_result = None
    try:
        proto = lowering.trace(model, attention, dtype, high, opset)
        raise_if_stopped()  # the exporter retries a capture that an interrupt broke; do not finish its work
        hashing = hashing_nodes(proto, model.config) if quantization is not None else {}  # before metadata goes
        lsh_nodes = _finish_graph(proto, model, attention, dtype, opset, high)
        if quantization is not None:
            if validate:  # the float graph first: an export fault must not pass as a quantization loss
                result = _validate(proto, model, attention, dtype, (low, high), log)
            (tmp / "quantize").mkdir()
            proto, quantization = quantize_int8(proto, hashing, quantization, tmp / "quantize")
            metadata.attach(proto, _metadata(model, attention, dtype, opset, high, quantization))
        external = proto.ByteSize() > EXTERNAL_DATA_BYTES
        if not external:  # one file: the bytes saved are the bytes fingerprinted
            metadata.seal(proto)
        model_file = _save(proto, tmp, target.name, external)
        onnx.checker.check_model(str(model_file))
        if validate and quantization is None:
            result = _validate(proto, model, attention, dtype, (low, high), log)
        elif validate:
            quality_result = _check_quality(proto, model, quality, high)
        _move_into_place(model_file, target, external)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = ExportReport(target, attention, dtype, opset, lowering.output_names(model), high, lsh_nodes,
                          _size(target, external), external, time.perf_counter() - start, result, quantization,
                          quality_result)
    if log is not None:
        log(report.summary())
    return report


def load_source(source: str | Path | nn.Module, max_length: int | None = None) -> Reformer:
    """The model to export: a reformer_rt model as given, or loaded from a checkpoint directory as the class its
    ``architectures`` name (``reformer_rt.models.load_pretrained``)."""
    if isinstance(source, tuple(TASKS)):
        if any(p.dtype != torch.float32 for p in source.parameters()):
            raise ExportError("source: got a model with non-float32 parameters; expected the float32 model "
                              "(float16 is an export option: dtype='float16')")
        bad = [name for name, p in source.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ExportError(f"source: parameter(s) {bad[:3]} hold NaN or infinite weights; expected finite "
                              "weights -- the model diverged or was loaded from a corrupt checkpoint")
        return source.eval()
    if isinstance(source, nn.Module):
        raise ExportError(f"source: got {type(source).__name__}; expected a reformer_rt model "
                          f"({', '.join(sorted(c.__name__ for c in TASKS))}) or a checkpoint directory (load HF "
                          "models with from_pretrained)")
    directory = Path(source)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint: {directory} is not a directory; expected a Reformer checkpoint "
                              "directory (config.json + model.safetensors / pytorch_model.bin)")
    return load_pretrained(directory, max_length)


def _check_options(attention: str, dtype: str, opset: int, quantization: Quantization | None) -> None:
    if attention not in ONNX_LOWERINGS:
        raise ExportError(f"attention: got {attention!r}; expected one of {ONNX_LOWERINGS}")
    if dtype not in lowering.DTYPES:
        raise ExportError(f"dtype: got {dtype!r}; expected one of {tuple(lowering.DTYPES)}")
    if quantization is not None and (attention, dtype) != ("portable", "float32"):
        raise ExportError(f"quantize {quantization.scheme}: got attention={attention!r}, dtype={dtype!r}; int8 "
                          "export quantizes the float32 portable graph (ONNX Runtime's tools): drop --attention "
                          "plugin / --dtype float16, or export without --quantize")
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset: got {opset!r}; expected an int in [{MIN_OPSET}, {MAX_OPSET}], the opsets this "
                          f"exporter writes (default {DEFAULT_OPSET})")


def _check_target(path: Path) -> Path:
    """``path`` made absolute, once it is an ``.onnx`` file name in an existing directory (checked before any
    work: a long export must not fail at its last step)."""
    target = path.absolute()
    if target.suffix != ".onnx":
        raise ExportError(f"output: got {path}; expected a file name ending in .onnx (reformer-rt run and build "
                          "recognise exports by that suffix)")
    if target.is_dir():
        raise ExportError(f"output: {target} is a directory; expected a file path such as model.onnx")
    if not target.parent.is_dir():
        why = "is not a directory" if target.parent.exists() else "does not exist"
        raise ExportError(f"output: cannot write to {target.parent} ({why}); choose a writable directory that "
                          "exists")
    return target


def _temp_dir(target: Path) -> Path:
    """A temporary directory beside ``target``, so the final rename stays on one file system."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"output: cannot write to {target.parent} ({os_error_hint(exc)})") from exc


def _finish_graph(proto: onnx.ModelProto, model: Reformer, attention: str, dtype: str, opset: int,
                  max_length: int) -> int:
    """Precision pass, node names, opset and metadata; returns the number of LSH plugin nodes."""
    if dtype == "float16":
        precision.upcast_reductions(proto)
    _strip_trace_metadata(proto.graph)
    nodes = [n for n in proto.graph.node if n.domain == ONNX_DOMAIN and n.op_type == OP_NAME]
    for index, node in enumerate(nodes):
        node.name = f"{OP_NAME}_{index}"
    expected = model.config.attn_layers.count("lsh") if attention == "plugin" else 0
    if len(nodes) != expected:
        raise RuntimeError(f"exporter bug: {len(nodes)} {OP_NAME} nodes in the {attention} graph; expected {expected}")
    if attention == "plugin" and not any(o.domain == ONNX_DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=ONNX_DOMAIN, version=OP_VERSION)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"opset: asked for {opset}, but the installed torch exporter wrote opset {written}; "
                          f"export with --opset {written}")
    metadata.attach(proto, _metadata(model, attention, dtype, opset, max_length, None))
    return len(nodes)


def _metadata(model: Reformer, attention: str, dtype: str, opset: int, max_length: int,
              quantization: Quantization | None) -> dict[str, str]:
    task = task_of(model)
    options = metadata.ExportOptions(attention, dtype, opset, max_length, task.outputs[0], task=task.name,
                                     output_names=task.outputs,
                                     quantize=None if quantization is None else quantization.to_json())
    return metadata.build(model.config, options)


def _strip_trace_metadata(graph: onnx.GraphProto) -> None:
    """Drop the tracer's per-node metadata (stack traces, fx names): most of a small file, and local paths."""
    for item in (*graph.node, *graph.input, *graph.output, *graph.initializer, *graph.value_info):
        del item.metadata_props[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_trace_metadata(attr.g)


def _save(proto: onnx.ModelProto, tmp: Path, name: str, external: bool) -> Path:
    model_file = tmp / name
    try:
        if external:
            onnx.save_model(proto, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{name}.data", size_threshold=1024)
        else:
            onnx.save_model(proto, str(model_file))
    except OSError as exc:
        raise ExportError(f"output: cannot write {model_file.name} in {tmp.parent} ({os_error_hint(exc)})") from exc
    return model_file


def _validate(proto: onnx.ModelProto, model: Reformer, attention: str, dtype: str, lengths: tuple[int, int],
              log: Callable[[str], None] | None) -> validation.ValidationResult:
    low, high = lengths
    shapes = validation.validation_shapes(model.config.chunk_multiple, low, high, lowering.sample_length(model, high))
    result = validation.validate(proto, model, attention, dtype, shapes)
    for case in result.cases:
        if log is not None:
            log(f"validate [{case.batch}, {case.length}]{' ragged' if case.ragged else ''}: "
                f"max abs diff {case.max_abs_diff:.3g} (rel {case.max_rel_diff:.3g})")
    if result.ran and not result.passed:
        worst = ", ".join(f"[{c.batch}, {c.length}] {c.max_abs_diff:.3g}" for c in result.cases)
        raise ValidationError(f"validation: the exported graph differs from the PyTorch model by "
                              f"{result.max_diff:.3g} ({result.metric}); expected <= {result.tolerance:g}. "
                              f"Per input shape (max abs diff): {worst}. The output was not written")
    return result


def _check_quality(proto: onnx.ModelProto, model: Reformer, check: QualityCheck, max_length: int) -> QualityResult:
    result = check_quantized(proto, model, check, max_length)  # reported by ExportReport.summary
    if not result.passed:
        raise ValidationError(f"validation: the int8 graph loses {result.comparison.increase:.4f} bits per token on "
                              f"{result.source} ({result.comparison.describe()}); expected an increase <= "
                              f"{result.limit:g} (--max-bpc-increase). Keep more of the model in float "
                              "(--keep-float) or export float32. The output was not written")
    return result


def _move_into_place(model_file: Path, target: Path, external: bool) -> None:
    raise_if_stopped()
    try:
        if external:
            os.replace(model_file.parent / f"{target.name}.data", target.parent / f"{target.name}.data")
        os.replace(model_file, target)
    except OSError as exc:
        raise ExportError(f"output: cannot write {target} ({os_error_hint(exc)})") from exc


def _size(target: Path, external: bool) -> int:
    size = target.stat().st_size
    return size + (target.parent / f"{target.name}.data").stat().st_size if external else size
