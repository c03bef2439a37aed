"""What an exported file says about itself, in ONNX ``metadata_props`` (all values are strings).

Keys (prefix ``reformer_rt.``): ``config`` (the resolved model config as JSON, transformers field names),
``op_contract_version``, ``hash_seed``, ``num_buckets`` (JSON: an int or a list of factors), ``export_options``
(JSON: attention, dtype, opset, max_length, padding rule, output name), ``package_version``. The runtime reads
these instead of guessing; ``read_metadata`` is the one parser.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import onnx

from reformer_rt.models import OP_VERSION, ReformerConfig

PREFIX = "reformer_rt."
PACKAGE = "reformer-rt"


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
