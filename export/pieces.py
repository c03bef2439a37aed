"""The streamed evaluation's pieces (``reformer_rt.models.streamed``) as ONNX graphs, for ONNX Runtime.

One graph per piece function, traced from the same functions ``TorchPieces`` calls, with the symbolic dimension of
each piece (its positions, or its chunks) dynamic. Weights are named initializers (``flat_names("w", ...)``), so
ONNX Runtime treats them as constants (pre-packed matrices, fused bias and activation: about 15 % faster than the
same graph taking them as inputs) while every layer of a kind shares one graph file: the runtime opens one session
per layer (and LSH head) with that layer's weights written in (``PieceSession``). A set therefore depends on the
model's config only. ``export_pieces`` writes a set into a directory with a manifest (``pieces.json``:
the config, the package version, each graph's file) and checks every graph, with weights other than those it was
traced with, against its torch function before it is used; a graph in which a weight was folded into another
constant would fail that check.

Known limits: float32 only; LM and bare models (``ReformerLM``, ``ReformerModel``); the classification and QA heads
run their whole-sequence graph.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import torch
from torch import nn

from reformer_rt.models import ReformerConfig
from reformer_rt.models.streamed import (
    FeedForwardWeights, LayerNormWeights, LocalWeights, LSHHeadWeights, ModelWeights, attention_output_piece,
    embed_piece, feed_forward_piece, final_norm_piece, lm_head_piece, local_attention_piece, lsh_attend_piece,
    lsh_project_piece,
)

from .lowering import _quiet
from .metadata import package_version

MANIFEST = "pieces.json"
OPSET = 18
#: Largest difference to the torch function accepted on the export sample (float32, the same formulation).
TOLERANCE = 1e-4


def flat(weights: Any) -> list[torch.Tensor]:
    """The tensors of a weights record (NamedTuples nest; a tuple of tensors stays in order), depth first."""
    if isinstance(weights, torch.Tensor):
        return [weights]
    return [t for item in weights for t in flat(item)]


def flat_names(prefix: str, weights: Any) -> list[str]:
    """Input names for ``flat(weights)``: the field path joined by underscores."""
    if isinstance(weights, torch.Tensor):
        return [prefix]
    if isinstance(weights, tuple) and hasattr(weights, "_fields"):
        return [n for field, item in zip(weights._fields, weights) for n in flat_names(f"{prefix}_{field}", item)]
    return [n for i, item in enumerate(weights) for n in flat_names(f"{prefix}_{i}", item)]


def _rebuild(template: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """A record shaped like ``template`` from ``tensors`` in ``flat`` order."""
    if isinstance(template, torch.Tensor):
        return next(tensors)
    items = [_rebuild(item, tensors) for item in template]
    return type(template)(*items) if hasattr(template, "_fields") else tuple(items)


@dataclasses.dataclass(frozen=True)
class PieceGraph:
    """One piece as a graph: its data inputs (then the weights' inputs, ``flat_names("w", ...)``), its outputs, and
    which axis of which data input is dynamic."""

    name: str
    data: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, int]  # data input -> its dynamic axis (the piece's positions or chunks)


PIECES = (
    PieceGraph("embed", ("ids", "positions"), ("embedded",), {"ids": 0, "positions": 0}),
    PieceGraph("local_attention", ("x", "mask", "positions"), ("out",), {"x": 0, "mask": 0, "positions": 0}),
    PieceGraph("lsh_project", ("x", "mask"), ("qk", "v", "buckets"), {"x": 0, "mask": 0}),
    PieceGraph("lsh_attend", ("qk", "v", "mask", "positions"), ("out", "lse"),
               {"qk": 0, "v": 0, "mask": 0, "positions": 0}),
    PieceGraph("attention_output", ("out",), ("projected",), {"out": 0}),
    PieceGraph("feed_forward", ("x",), ("y",), {"x": 0}),
    PieceGraph("final_norm", ("attn", "hidden"), ("normed",), {"attn": 0, "hidden": 0}),
    PieceGraph("lm_head", ("hidden",), ("logits",), {"hidden": 0}),
)
PIECE_NAMES = tuple(p.name for p in PIECES)


class PieceWeights(NamedTuple):
    """A sample of each piece's weights (the shapes every layer's share), from one model."""

    embed: tuple[torch.Tensor, ...]
    local: LocalWeights | None
    lsh_head: LSHHeadWeights | None
    attention_output: torch.Tensor | None
    feed_forward: FeedForwardWeights
    final_norm: LayerNormWeights
    lm_head: tuple[torch.Tensor, torch.Tensor] | None


def sample_weights(body: nn.Module, lm_head: nn.Module | None) -> PieceWeights:
    """One layer's weights of each kind from a model (``ReformerModel`` and its LM head, if any)."""
    weights = ModelWeights.of(body)
    kinds = body.config.attn_layers
    local = weights.attention[kinds.index("local")] if "local" in kinds else None
    lsh = weights.attention[kinds.index("lsh")][0] if "lsh" in kinds else None
    head = None if lm_head is None else (lm_head.decoder.weight, lm_head.decoder.bias)
    output = next((w[0] for w in weights.attention_output if w), None)
    return PieceWeights((weights.word, *weights.tables), local, lsh, output,
                        weights.feed_forward[0], weights.final_norm, head)


def piece_function(name: str, config: ReformerConfig, weights: PieceWeights) -> tuple[Callable[..., Any], Any]:
    """(fn of the data inputs then ``flat(record)``, record): the piece ``name`` with weights as arguments."""
    if name == "embed":
        return (lambda ids, positions, word, *tables: embed_piece(ids, positions, word, tables, config)), weights.embed
    if name == "local_attention":
        return (lambda x, mask, positions, *w: local_attention_piece(
            x, mask, positions, _rebuild(weights.local, iter(w)), config)), weights.local
    if name == "lsh_project":
        return (lambda x, mask, *w: lsh_project_piece(x, mask, _rebuild(weights.lsh_head, iter(w)), config)), \
            weights.lsh_head
    if name == "lsh_attend":
        return (lambda qk, v, mask, positions: lsh_attend_piece(qk, v, mask, positions, config)), ()
    if name == "attention_output":
        return attention_output_piece, (weights.attention_output,)
    if name == "feed_forward":
        return (lambda x, *w: feed_forward_piece(x, _rebuild(weights.feed_forward, iter(w)), config)), \
            weights.feed_forward
    if name == "final_norm":
        return (lambda attn, hidden, *w: final_norm_piece(attn, hidden, LayerNormWeights(*w), config)), \
            weights.final_norm
    if name == "lm_head":
        return lm_head_piece, weights.lm_head
    raise ValueError(f"piece: got {name!r}; expected one of {PIECE_NAMES}")


def sample_inputs(name: str, config: ReformerConfig, chunks: int = 3) -> tuple[torch.Tensor, ...]:
    """Data inputs of a sample for tracing and checking: ``chunks`` chunks of each kind (at least 2: torch.export
    specialises dimensions of size 0 and 1), random values, mask with padding at the end."""
    generator = torch.Generator().manual_seed(0)
    hidden, dim = config.hidden_size, config.attention_head_size
    if name in ("local_attention", "lsh_attend"):
        chunk = config.local_attn_chunk_length if name == "local_attention" else config.lsh_attn_chunk_length
        before, after = ((config.local_num_chunks_before, config.local_num_chunks_after) if name == "local_attention"
                         else (config.lsh_num_chunks_before, config.lsh_num_chunks_after))
        n_ext = chunks + before + after
        mask = torch.ones(n_ext, chunk, dtype=torch.int32)
        mask[-1, chunk // 2:] = 0
        positions = torch.randperm(n_ext * chunk + 7, generator=generator)[:n_ext * chunk].view(n_ext, chunk)
        if name == "local_attention":
            return torch.randn(n_ext, chunk, hidden, generator=generator), mask, positions
        return (torch.randn(n_ext, chunk, dim, generator=generator), torch.randn(n_ext, chunk, dim, generator=generator),
                mask, positions)
    rows = chunks * config.chunk_multiple + 2
    if name == "embed":
        return (torch.randint(0, config.vocab_size, (rows,), generator=generator),
                torch.randint(0, config.max_position_embeddings, (rows,), generator=generator))
    if name == "lsh_project":
        mask = torch.ones(rows, dtype=torch.int32)
        mask[-3:] = 0
        return torch.randn(rows, hidden, generator=generator), mask
    width = {"attention_output": dim, "lm_head": 2 * hidden}.get(name, hidden)
    tensors = [torch.randn(rows, width, generator=generator)]
    if name == "final_norm":
        tensors.append(torch.randn(rows, hidden, generator=generator))
    return tuple(tensors)


def needed_pieces(config: ReformerConfig, lm: bool) -> tuple[str, ...]:
    """The pieces a model of ``config`` runs (no local graph without local layers, no head without an LM head)."""
    skip = {"local_attention", "lsh_project", "lsh_attend", "attention_output"} - {
        *(["local_attention"] if "local" in config.attn_layers else []),
        *(["lsh_project", "lsh_attend", "attention_output"] if "lsh" in config.attn_layers else [])}
    if not lm:
        skip.add("lm_head")
    return tuple(name for name in PIECE_NAMES if name not in skip)


class _Graph(nn.Module):
    """A piece with its weights as parameters named ``flat_names("w", record)`` (the graph's initializer names)."""

    def __init__(self, fn: Callable[..., Any], names: list[str], tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.fn, self.names = fn, names
        for n, tensor in zip(names, tensors):
            self.register_parameter(n, nn.Parameter(tensor.detach().clone(), requires_grad=False))

    def forward(self, *data: torch.Tensor) -> Any:
        return self.fn(*data, *(getattr(self, n) for n in self.names))


def trace_piece(name: str, config: ReformerConfig, weights: PieceWeights) -> onnx.ModelProto:
    """The ONNX graph of one piece: its data inputs, its weights as initializers named ``flat_names("w", ...)``.
    Traced without the exporter's optimizer, which could fold a weight into a new constant (a reshaped rotation
    table) that ``add_initializer`` then could not replace; ONNX Runtime optimizes the graph when it opens it."""
    spec = next(p for p in PIECES if p.name == name)
    fn, record = piece_function(name, config, weights)
    data = sample_inputs(name, config)
    dim = torch.export.Dim(f"{name}_n", min=2)
    dynamic = tuple({spec.dynamic[n]: dim} if n in spec.dynamic else None for n in spec.data)
    graph = _Graph(fn, flat_names("w", record), flat(record))
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(graph, data, dynamo=True, input_names=list(spec.data),
                                    output_names=list(spec.outputs), opset_version=OPSET, dynamic_shapes=(dynamic,),
                                    optimize=False, verbose=False)
    proto = program.model_proto
    initializers = {t.name for t in proto.graph.initializer}
    missing = sorted(set(graph.names) - initializers)
    if missing:
        raise RuntimeError(f"exporter bug: piece {name} lost the initializers {missing}")
    return proto


_SHARED_ARENA: list[bool] = []


def shared_arena() -> bool:
    """One CPU memory arena for every piece session of the process (registered once with ONNX Runtime's
    environment), so that memory freed by one piece serves the next: with an arena per session, each of a model's
    twenty-odd sessions kept its own high-water mark (3.07 GB peak at 262,144 tokens, crime-and-punishment). It
    grows by what is asked (``kSameAsRequested``), not to the next power of two. False where ONNX Runtime refuses."""
    if not _SHARED_ARENA:
        import os
        import onnxruntime as ort
        if os.environ.get("NOSHARE"):
            _SHARED_ARENA.append(False)
            return False

        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _SHARED_ARENA.append(True)
        except Exception:  # onnxruntime raises its own types; sessions then keep arenas of their own
            _SHARED_ARENA.append(False)
    return _SHARED_ARENA[0]


class PieceSession:
    """One ONNX Runtime session of a piece graph with one layer's weights (initializer name -> float32 array) in
    place of the graph's. The weights are written into a copy of the graph before ONNX Runtime reads it:
    ``SessionOptions.add_initializer`` would share the arrays, but ONNX Runtime 1.32's constant folding reads the
    graph's own initializers, so a folded expression of a weight (a transposed matrix, a sliced table) kept the traced
    values (measured: the embedding piece's position tables). Arena on, memory patterns off (dynamic shapes), no
    spinning between runs (the streamed driver's own torch work runs between them on the same cores)."""

    def __init__(self, graph: onnx.ModelProto, weights: dict[str, Any], threads: int = 0) -> None:
        import onnxruntime as ort
        from onnx import numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(graph)
        for tensor in model.graph.initializer:
            if tensor.name in weights:
                tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if shared_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, data: Any) -> list[Any]:
        """The graph's outputs (numpy arrays) for its data inputs, in order."""
        return self.session.run(None, dict(zip(self.inputs, data)))


def check_piece(path: Path, name: str, config: ReformerConfig, weights: PieceWeights) -> float:
    """Largest difference between the graph at ``path`` (ONNX Runtime, CPU) given other weights (the sample's,
    scaled by 1.25) and the torch piece with those weights, on a sample one chunk longer than the trace saw."""
    fn, record = piece_function(name, config, weights)
    data = sample_inputs(name, config, chunks=4)
    tensors = [t.detach() * 1.25 if t.is_floating_point() else t.detach() for t in flat(record)]
    arrays = {n: t.numpy() for n, t in zip(flat_names("w", record), tensors)}
    got = PieceSession(onnx.load(str(path)), arrays).run([t.numpy() for t in data])
    with torch.no_grad():
        expected = fn(*data, *tensors)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(float((torch.from_numpy(g).double() - e.double()).abs().max()) for g, e in zip(got, expected))


def export_pieces(body: nn.Module, lm_head: nn.Module | None, directory: Path) -> dict[str, Any]:
    """Every piece graph a model needs into ``directory`` (which must exist) with its manifest; returns the manifest.
    Raises ``RuntimeError`` when a graph differs from its torch function by more than ``TOLERANCE``."""
    config: ReformerConfig = body.config
    weights = sample_weights(body, lm_head)
    graphs = {}
    for name in needed_pieces(config, lm_head is not None):
        path = directory / f"{name}.onnx"
        onnx.save_model(trace_piece(name, config, weights), str(path))
        diff = check_piece(path, name, config, weights)
        if not diff <= TOLERANCE:
            raise RuntimeError(f"exporter bug: piece {name} differs from its torch function by {diff:.3g}; expected "
                               f"<= {TOLERANCE:g}")
        graphs[name] = {"file": path.name, "max_abs_diff": diff}
    manifest = {"config": config.to_dict(), "package_version": package_version(), "opset": OPSET, "graphs": graphs}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """A piece set's manifest, or None when it is missing or unreadable (the caller exports again)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("graphs"), dict):
        return None
    if not all((directory / str(entry.get("file", ""))).is_file() for entry in manifest["graphs"].values()):
        return None
    return manifest


