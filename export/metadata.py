"""What an exported file says about itself, in ONNX ``metadata_props`` (all values are strings).

Keys (prefix ``reformer_rt.``): ``config`` (the resolved model config as JSON, transformers field names),
``op_contract_version``, ``hash_seed``, ``num_buckets`` (JSON: an int or a list of factors), ``export_options``
(JSON: attention, dtype, opset, max_length, padding rule, output name), ``package_version``. The runtime reads
these instead of guessing: ``read_metadata`` is the one parser, ``export_metadata`` the one check that a file is a
readable reformer-rt export whose metadata agrees with its graph (and, when asked, in the LSH form the caller needs).

The graph interface is named here once: inputs ``GRAPH_INPUTS`` (int64 [batch, length]), output ``LM_OUTPUT`` or
``BASE_OUTPUT``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import onnx

from reformer_rt.models import OP_VERSION, InputError, ReformerConfig

PREFIX = "reformer_rt."
PACKAGE = "reformer-rt"
GRAPH_INPUTS = ("input_ids", "attention_mask")
LM_OUTPUT = "logits"
BASE_OUTPUT = "last_hidden_state"
ATTENTION_FORMS = ("plugin", "portable")
#: What each LSH form is and who needs it, for the error that refuses a file in the other form.
_FORMS = {
    "portable": ("standard ONNX ops, for ONNX Runtime", "ONNX Runtime needs the portable form: reformer-rt export "
                 "CHECKPOINT -o MODEL.onnx --attention portable"),
    "plugin": ("LSHAttention plugin nodes, which run on TensorRT only", "TensorRT engines need the plugin form (one "
               "LSHAttention node per layer): reformer-rt export CHECKPOINT -o MODEL.onnx --attention plugin"),
}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    attention: str
    dtype: str
    opset: int
    max_length: int
    output_name: str
    #: How lengths that are not a chunk multiple are handled: padded inside the graph, output cut back.
    padding: str = "in_graph"


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
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not a file; expected an ONNX file written by reformer-rt export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and others for a file that is not ONNX
        raise InputError(f"{path}: cannot read it as ONNX ({type(exc).__name__}: {exc}); expected a file written "
                         "by reformer-rt export") from exc
    entries = {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    redo = "re-export it with reformer-rt export"
    if "config" not in entries or "export_options" not in entries:
        raise InputError(f"{path}: no reformer_rt metadata; expected a file written by reformer-rt export ({redo})")
    try:
        metadata = read_metadata(path)
        ReformerConfig.from_dict(metadata["config"])
        options = metadata["export_options"]
        form, output, max_length = options["attention"], options["output_name"], int(options["max_length"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: its reformer_rt metadata is malformed ({type(exc).__name__}: {exc}); {redo}") from exc
    inputs = tuple(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    outputs = tuple(o.name for o in model.graph.output)
    if sorted(inputs) != sorted(GRAPH_INPUTS) or output not in outputs or form not in ATTENTION_FORMS \
            or max_length < 1:
        raise InputError(f"{path}: metadata disagrees with the graph (metadata: output {output!r}, attention "
                         f"{form!r}, max_length {max_length}; graph: inputs {list(inputs)}, outputs "
                         f"{list(outputs)}); {redo}")
    if attention is not None and form != attention:
        raise InputError(f"{path}: attention={form!r} ({_FORMS[form][0]}); {_FORMS[attention][1]}")
    return metadata
