"""What an exported file says about itself, in ONNX ``metadata_props`` (all values are strings).

Keys (prefix ``reformer_rt.``): ``config`` (the resolved model config as JSON, transformers field names),
``op_contract_version``, ``hash_seed``, ``num_buckets`` (JSON: an int or a list of factors), ``export_options``
(JSON: attention, dtype, opset, max_length, padding rule, output name, and ``quantize``: null for a float graph, else
the ``Quantization`` record), ``package_version``, and ``sha256`` (the
file's own fingerprint: sha256 of the serialized model without that entry; ``seal`` adds it, so a file damaged
or edited after export is refused instead of computing wrong numbers -- not recorded for graphs over 2 GB, whose
weights live in external data). The runtime reads
these instead of guessing: ``read_metadata`` is the one parser, ``export_metadata`` the one check that a file is a
readable reformer-rt export whose metadata agrees with its graph (inputs, output and its width, opset, LSH nodes,
max_length, int8 products) and, when asked, in the LSH form the caller needs; ``export_info`` gives the same
check's result as one typed ``ExportInfo``, and ``ExportInfo.parse`` reads metadata kept elsewhere (an engine's
record). ``RUNS_ON`` says which runtimes run each form.

The graph's inputs are named here once (``GRAPH_INPUTS``: int64 [batch, length]); its outputs are the task's
(``reformer_rt.models.heads.TASKS``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import onnx

from reformer_rt.models import OP_VERSION, ConfigError, InputError, ReformerConfig
from reformer_rt.models.heads import Task, task_named
from reformer_rt.models.lsh import ONNX_DOMAIN, OP_NAME

PREFIX = "reformer_rt."
DIGEST_KEY = PREFIX + "sha256"
PACKAGE = "reformer-rt"
GRAPH_INPUTS = ("input_ids", "attention_mask")
ATTENTION_FORMS = ("plugin", "portable")
#: The op of a quantized weight product in an int8 export (ONNX Runtime's dynamic quantization writes it).
QUANTIZED_PRODUCT = "MatMulInteger"
#: What each LSH form is and who needs it, for the error that refuses a file in the other form.
_FORMS = {
    "portable": ("standard ONNX ops, for ONNX Runtime", "ONNX Runtime needs the portable form: reformer-rt export "
                 "CHECKPOINT -o MODEL.onnx --attention portable"),
    "plugin": ("LSHAttention plugin nodes, which run on TensorRT only", "TensorRT engines need the plugin form (one "
               "LSHAttention node per layer): reformer-rt export CHECKPOINT -o MODEL.onnx --attention plugin"),
}
#: Who can run a file of each LSH form (printed by ``reformer-rt export``).
RUNS_ON = {
    "portable": "ONNX Runtime on CPU or CUDA (reformer-rt run / serve, Session); not TensorRT (export with "
                "--attention plugin for that)",
    "plugin": "TensorRT with the reformer-rt plugin only (reformer-rt build, then run the engine); not ONNX Runtime "
              "(export with --attention portable for that)",
}


#: Quantization schemes an export can be written with (``export/quantize.py``).
QUANTIZE_SCHEMES = ("int8",)
#: The parts of the LSH hashing path that can stay in float when the rest is quantized: each layer's rotation
#: product (inside the hashed branch) and its shared query/key projection. Kept by default: measured on the demo
#: model's held-out text, they move bucket ids when quantized at no measurable speed gain (README, "int8").
HASHING_PARTS = ("rotations", "query_key")


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How an export's weight products were quantized (``ExportInfo.quantization``; None for a float graph).

    ``scheme`` "int8": ONNX Runtime's dynamic quantization -- int8 weights with one scale per output channel,
    activations quantized to uint8 per tensor when the graph runs. ``fp32`` names the ``HASHING_PARTS`` left in
    float; ``products`` counts the quantized weight products (``MatMulInteger`` nodes); ``tool`` is what wrote them.
    """

    scheme: str = "int8"
    fp32: tuple[str, ...] = HASHING_PARTS
    products: int = 0
    tool: str = ""

    def __post_init__(self) -> None:
        if self.scheme not in QUANTIZE_SCHEMES:
            raise InputError(f"quantize: got {self.scheme!r}; expected one of {QUANTIZE_SCHEMES}")
        if isinstance(self.fp32, str) or set(self.fp32) - set(HASHING_PARTS):
            raise InputError(f"quantize: parts kept in float: got {self.fp32!r}; expected a subset of {HASHING_PARTS}")
        object.__setattr__(self, "fp32", tuple(p for p in HASHING_PARTS if p in self.fp32))  # one canonical order

    @classmethod
    def of(cls, value: str | Quantization | None) -> Quantization | None:
        """A caller's ``quantize`` argument: None, a scheme name ("int8", with the default float parts) or a record."""
        if value is None or isinstance(value, Quantization):
            return value
        if not isinstance(value, str):
            raise InputError(f"quantize: got {type(value).__name__}; expected one of {QUANTIZE_SCHEMES}, a "
                             "Quantization or None")
        return cls(value)

    def same_choice(self, other: Quantization | None) -> bool:
        """Whether ``other`` asks for this scheme with the same parts in float (what a caller can choose)."""
        return other is not None and (self.scheme, self.fp32) == (other.scheme, other.fp32)

    def describe(self) -> str:
        kept = ", ".join(self.fp32) or "nothing"
        return f"{self.scheme} (weights per channel, activations per tensor at run time; float: {kept})"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fp32": list(self.fp32)}

    @classmethod
    def from_json(cls, data: Any) -> Quantization | None:
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("fp32"), list):
            raise InputError(f"export_options.quantize: got {data!r}; expected null or an object with 'scheme' and "
                             "'fp32'")
        return cls(str(data.get("scheme")), tuple(data["fp32"]), int(data.get("products", 0)),
                   str(data.get("tool", "")))


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    attention: str
    dtype: str
    opset: int
    max_length: int
    output_name: str  # the first of ``output_names``
    #: How lengths that are not a chunk multiple are handled: padded inside the graph, output cut back.
    padding: str = "in_graph"
    #: The model's task (``reformer_rt.models.heads.TASKS``) and every graph output, in order.
    task: str = "lm"
    output_names: tuple[str, ...] = ()
    quantize: dict[str, Any] | None = None  # ``Quantization.to_json()``; None: a float graph


#: What to do about metadata that is missing or malformed in an export (``ExportInfo.parse``'s default).
REEXPORT = "re-export it with reformer-rt export"


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What an export records about itself, read once into types (``export_info`` for a file, ``parse`` for
    metadata kept elsewhere, such as an engine's record)."""

    config: ReformerConfig
    task: Task  # its row of ``reformer_rt.models.heads.TASKS``: the graph's outputs and what they hold
    attention: str  # the LSH form: "plugin" or "portable"
    dtype: str
    opset: int
    max_length: int  # the longest input the graph was exported for
    padding: str
    package_version: str  # of the reformer-rt that wrote it ("unknown" when it did not say)
    quantization: Quantization | None = None  # None: float weights and products

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph's outputs, in order."""
        return self.task.outputs

    @classmethod
    def parse(cls, metadata: Any, where: str = "export metadata", fix: str = REEXPORT) -> ExportInfo:
        """``read_metadata``'s dict (or an engine record's copy of it) as an ``ExportInfo``; a missing or malformed
        entry is one ``InputError``: ``where``, the entry, what was expected, and ``fix``."""
        options = metadata.get("export_options") if isinstance(metadata, dict) else None
        if not isinstance(options, dict) or not isinstance(metadata.get("config"), dict):
            raise InputError(f"{where}: got {_keys(metadata)}; expected the 'config' and 'export_options' entries "
                             f"reformer-rt export writes; {fix}")
        try:
            config = ReformerConfig.from_dict(metadata["config"])
            task = recorded_task(options)
            attention, dtype, padding = (_text(options, key) for key in ("attention", "dtype", "padding"))
            opset, max_length = _integer(options, "opset"), _integer(options, "max_length")
            quantization = Quantization.from_json(options.get("quantize"))  # absent before quantization existed
        except (ValueError, TypeError) as exc:  # ConfigError and InputError are ValueErrors
            raise InputError(f"{where}: {exc}; {fix}") from exc
        return cls(config, task, attention, dtype, opset, max_length, padding,
                   str(metadata.get("package_version", "unknown")), quantization)


def _keys(metadata: Any) -> str:
    return f"entries {sorted(metadata)}" if isinstance(metadata, dict) else type(metadata).__name__


def _text(options: dict[str, Any], key: str) -> str:
    value = options.get(key, "in_graph" if key == "padding" else None)  # files before padding was recorded
    if not isinstance(value, str):
        raise InputError(f"export_options.{key}: got {value!r}; expected a string")
    return value


def _integer(options: dict[str, Any], key: str) -> int:
    value = options.get(key)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"export_options.{key}: got {value!r}; expected an integer") from None


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build(config: ReformerConfig, options: ExportOptions) -> dict[str, str]:
    extra = {"chunk_multiple": config.chunk_multiple}
    return {
        PREFIX + "config": config.to_json(),
        PREFIX + "op_contract_version": str(OP_VERSION),
        PREFIX + "hash_seed": str(config.hash_seed),
        PREFIX + "num_buckets": json.dumps(config.num_buckets),
        PREFIX + "export_options": json.dumps({**dataclasses.asdict(options), **extra}, sort_keys=True),
        PREFIX + "package_version": package_version(),
    }


def attach(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Set ``metadata`` on ``model``, replacing entries with the same keys."""
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)


def content_sha256(model: onnx.ModelProto) -> str:
    """sha256 of ``model`` serialized without its ``DIGEST_KEY`` entry (protobuf's serialization of a parsed file
    gives back the same bytes, so this is stable across save and load)."""
    entries = [(p.key, p.value) for p in model.metadata_props]
    del model.metadata_props[:]
    for key, value in entries:
        if key != DIGEST_KEY:
            model.metadata_props.add(key=key, value=value)
    try:
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    finally:
        del model.metadata_props[:]
        for key, value in entries:
            model.metadata_props.add(key=key, value=value)


def seal(model: onnx.ModelProto) -> None:
    """Record ``model``'s fingerprint in it (the last change before it is saved)."""
    attach(model, {DIGEST_KEY: content_sha256(model)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``reformer_rt.*`` entries of an exported file, JSON values decoded, without loading its weights."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(PREFIX):
            key = prop.key[len(PREFIX):]
            out[key] = json.loads(prop.value) if key in ("config", "num_buckets", "export_options") else prop.value
    return out


def export_metadata(path: str | Path, attention: str | None = None) -> dict[str, Any]:
    """The metadata of the reformer-rt export at ``path``, checked: a readable ONNX file, our entries present and
    parseable, the graph's inputs and output those the metadata names, and -- when ``attention`` is given -- that
    LSH form. Every problem is one ``InputError`` saying what to do."""
    return _checked_export(Path(path), attention)[0]


def export_info(path: str | Path, attention: str | None = None) -> ExportInfo:
    """``export_metadata``'s check of the file at ``path``, its result typed: what the runtime reads."""
    return _checked_export(Path(path), attention)[1]


def _checked_export(path: Path, attention: str | None) -> tuple[dict[str, Any], ExportInfo]:
    if not path.is_file():
        raise InputError(f"{path}: not a file; expected an ONNX file written by reformer-rt export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and others for a file that is not ONNX
        raise InputError(f"{path}: cannot read it as ONNX ({type(exc).__name__}: {exc}); expected a file written "
                         "by reformer-rt export") from exc
    if not all(isinstance(p.key, str) and isinstance(p.value, str) for p in model.metadata_props):
        raise InputError(f"{path}: damaged (its metadata is not UTF-8 text); {REEXPORT}")  # protobuf gives bytes then
    entries = {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if "config" not in entries or "export_options" not in entries:
        raise InputError(f"{path}: no reformer_rt metadata; expected a file written by reformer-rt export "
                         f"({REEXPORT})")
    recorded = entries.get(DIGEST_KEY[len(PREFIX):])
    if recorded is not None and recorded != content_sha256(model):
        raise InputError(f"{path}: damaged or edited since it was exported (its contents no longer match the sha256 "
                         f"recorded in it); {REEXPORT}")
    malformed = f"{path}: its reformer_rt metadata is malformed"
    try:
        metadata = read_metadata(path)
    except ValueError as exc:  # an entry that is not JSON
        raise InputError(f"{malformed} ({type(exc).__name__}: {exc}); {REEXPORT}") from exc
    info = ExportInfo.parse(metadata, where=malformed)
    disagreements = _disagreements(model, info, metadata["export_options"]["output_name"])
    if disagreements:
        raise InputError(f"{path}: its reformer_rt metadata disagrees with its graph ({'; '.join(disagreements)}); "
                         f"{REEXPORT}")
    if attention is not None and info.attention != attention:
        raise InputError(f"{path}: attention={info.attention!r} ({_FORMS[info.attention][0]}); {_FORMS[attention][1]}")
    return metadata, info


def recorded_task(options: dict[str, Any]) -> Task:
    """The task an export's options record, its outputs checked against the task table; files written before tasks
    were recorded are LM or base models with one output, which says which."""
    output = options.get("output_name")
    if not isinstance(output, str):
        raise InputError(f"export_options.output_name: got {output!r}; expected the graph's first output's name")
    names = tuple(options.get("output_names") or (output,))
    recorded = options.get("task")
    if not recorded:  # written before tasks were recorded: an LM's or a base model's one output says which
        recorded = "lm" if names == task_named("lm").outputs else "base"
    task = task_named(recorded)
    if names != task.outputs:
        raise ConfigError(f"export_options: task {task.name!r} with outputs {list(names)}; expected that task's "
                          f"outputs {list(task.outputs)}")
    return task


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs (``If`` branches) inside it."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(all_nodes(attr.g))
    return nodes


def _disagreements(model: onnx.ModelProto, info: ExportInfo, primary: str) -> list[str]:
    """Each way the graph differs from what its metadata says, as 'metadata says X, graph has Y'."""
    graph = model.graph
    inputs = {i.name: i for i in graph.input if i.name not in {t.name for t in graph.initializer}}
    outputs = {o.name: o for o in graph.output}
    config, form, max_length, opset = info.config, info.attention, info.max_length, info.opset
    found = []
    if sorted(inputs) != sorted(GRAPH_INPUTS) or any(
            i.type.tensor_type.elem_type != onnx.TensorProto.INT64 for i in inputs.values()):
        found.append(f"inputs: expected int64 {list(GRAPH_INPUTS)}, graph has {list(inputs)}")
    if list(info.outputs) != list(outputs):
        found.append(f"outputs: metadata says {list(info.outputs)}, graph has {list(outputs)}")
    elif primary != info.outputs[0]:
        found.append(f"output: metadata says {primary!r} first, graph has {list(outputs)}")
    for raw in info.task.graph:
        name, width = raw.exported_name, raw.size(config)
        dims = outputs[name].type.tensor_type.shape.dim if name in outputs else ()
        if width is not None and dims and dims[-1].HasField("dim_value") and dims[-1].dim_value != width:
            found.append(f"{name} width: config says {width}, graph has {dims[-1].dim_value}")
    if form not in ATTENTION_FORMS:
        found.append(f"attention: metadata says {form!r}, expected one of {ATTENTION_FORMS}")
    else:
        nodes = sum(n.op_type == OP_NAME and n.domain == ONNX_DOMAIN for n in graph.node)
        expected = config.attn_layers.count("lsh") if form == "plugin" else 0
        if nodes != expected:
            found.append(f"attention: metadata says {form!r} ({expected} {OP_NAME} nodes), graph has {nodes}")
    products = sum(n.op_type == QUANTIZED_PRODUCT for n in all_nodes(graph))
    recorded = info.quantization.products if info.quantization is not None else 0
    if products != recorded:
        found.append(f"quantize: metadata says {recorded} int8 weight products, graph has {products} "
                     f"{QUANTIZED_PRODUCT} nodes")
    if not 1 <= max_length <= config.max_position_embeddings:
        found.append(f"max_length: metadata says {max_length}, expected 1..{config.max_position_embeddings} "
                     "(max_position_embeddings)")
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        found.append(f"opset: metadata says {opset}, graph has {written}")
    return found
