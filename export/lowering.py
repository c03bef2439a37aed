"""Trace a Reformer to ONNX with ``torch.onnx.export(dynamo=True)``: the graph interface and the two LSH lowerings.

The graph takes ``input_ids`` and ``attention_mask`` (int64 [batch, length]) and returns ``logits`` (LM) or
``last_hidden_state``. It pads the length in-graph to the model's chunk multiple ``m`` (pad id / mask 0, as the
PyTorch model and HF do), runs the model's own ``forward`` and cuts back, so any length 1..max_length runs.

Tracing uses a symbolic length declared in ``(m, max_length]``: the padded length is then at least ``2m`` and
every Python test on it in the model (padding rule, ``L <= chunk`` short paths) resolves to the chunked path.
Lengths ``<= m`` are still correct in the graph: they pad to ``m``, where the chunked formulas reduce to full
attention over the real tokens (padding keys get exactly zero weight; with a single chunk, look-around repeats
the same keys, which leaves softmax unchanged). The LSH layers keep HF's short path exactly: the plugin op
implements it itself, and the portable lowering carries it as an ONNX ``If`` (see ``models/lsh_op.py``).
The trace runs inside ``fused_attention()`` (``models/fused.py``): the graph holds the fused chunk attention, and
validation compares it with the model's reference forward.

Known limits: feed-forward / LM-head chunking (a memory knob with identical results) is exported unchunked,
because the number of chunks of a symbolic length cannot be traced; float16 graphs are traced from a float16
copy of the weights (rotations stay float32, as the op contract requires) and then pass through
``precision.upcast_reductions``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from collections.abc import Iterator

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from reformer_rt.models import Reformer, task_of
from reformer_rt.models.fused import fused_attention
from reformer_rt.models.lsh_op import onnx_lowering

from .errors import ExportError
from .metadata import GRAPH_INPUTS

DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Batch size of the trace sample; 2 keeps torch.export from specializing the axis (it specializes 0 and 1).
SAMPLE_BATCH = 2


class OnnxInterface(nn.Module):
    """The exported signature: (input_ids, attention_mask) int64 [B, L] -> the model's outputs (``task_of``): per
    position [B, L, ...] (logits, hidden states, QA start/end logits) or per sequence [B, ...] (class logits).

    Pads L up to the chunk multiple inside the graph and cuts the per-position outputs back to L.
    """

    def __init__(self, model: Reformer) -> None:
        super().__init__()
        self.model = model
        self.multiple = model.config.chunk_multiple
        self.pad_id = model.config.pad_token_id or 0
        self.per_position = task_of(model).per_position

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        length = input_ids.shape[1]
        pad = (self.multiple - length % self.multiple) % self.multiple
        input_ids = F.pad(input_ids, (0, pad), value=self.pad_id)
        attention_mask = F.pad(attention_mask, (0, pad), value=0)
        outputs = self.model(input_ids, attention_mask)
        outputs = tuple(outputs) if isinstance(outputs, tuple) else (outputs,)
        return tuple(out[:, :length] if cut else out for out, cut in zip(outputs, self.per_position))


def output_names(model: Reformer) -> tuple[str, ...]:
    """The graph's outputs, in order (the model's task: ``reformer_rt.models.heads.TASKS``)."""
    return task_of(model).outputs


def exportable_copy(model: Reformer, dtype: str) -> Reformer:
    """A copy to trace: feed-forward chunking off (same results), parameters in ``dtype``, rotations float32."""
    config = dataclasses.replace(model.config, chunk_size_feed_forward=0, chunk_size_lm_head=0)
    clone = type(model)(config)
    clone.load_state_dict(model.state_dict())
    for param in clone.parameters():
        param.data = param.data.to(DTYPES[dtype])
    return clone.eval()


def length_range(model: Reformer, max_length: int | None) -> tuple[int, int]:
    """(lowest traced length, max_length): the trace needs lengths above one chunk multiple (module docstring)."""
    config = model.config
    high = config.max_position_embeddings if max_length is None else max_length
    if not isinstance(high, int) or isinstance(high, bool) or high > config.max_position_embeddings:
        raise ExportError(f"max_length: got {max_length!r}; expected an int <= max_position_embeddings="
                          f"{config.max_position_embeddings}")
    low = config.chunk_multiple + 1
    if high <= low:
        raise ExportError(f"max_length: got {high}; expected more than {low} (one chunk multiple, "
                          f"{config.chunk_multiple}, plus one) so the graph can be traced with a dynamic length")
    return low, high


def sample_length(model: Reformer, max_length: int) -> int:
    """Length of the trace sample: inside the traced range, not a chunk multiple, never equal to the batch."""
    low = model.config.chunk_multiple + 1
    return max(min(max_length, 2 * model.config.chunk_multiple + 1), low, SAMPLE_BATCH + 1)


def trace(model: Reformer, attention: str, dtype: str, max_length: int | None, opset: int) -> onnx.ModelProto:
    """The ONNX model (weights in memory) of ``model`` with the given LSH lowering and precision."""
    low, high = length_range(model, max_length)
    ids = torch.zeros(SAMPLE_BATCH, sample_length(model, high), dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=low, max=high)
    axes = {0: batch, 1: length}
    wrapper = OnnxInterface(exportable_copy(model, dtype)).eval()
    with torch.no_grad(), onnx_lowering(attention), fused_attention(), _quiet():
        try:
            program = torch.onnx.export(
                wrapper, (ids, torch.ones_like(ids)), dynamo=True, input_names=list(GRAPH_INPUTS),
                output_names=list(output_names(model)), opset_version=opset,
                dynamic_shapes={GRAPH_INPUTS[0]: axes, GRAPH_INPUTS[1]: axes}, verbose=False)
        except Exception as exc:  # torch.export raises many types; the model is not the user's to fix
            raise RuntimeError(f"torch.onnx.export failed for {type(model).__name__} ({attention}, {dtype}): "
                               f"{type(exc).__name__}: {exc}") from exc
    return program.model_proto


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints, warnings and log lines (e.g. "torchvision is not installed");
    errors still propagate."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)
