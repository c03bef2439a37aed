"""Task metrics of a quantized model against the float PyTorch model, on text: what export validation reports for
an int8 graph, where the largest absolute difference of the logits says little about what a user loses.

* **Bits per token** (per character for a byte-level model): the mean of -log2 p(next token) over every predicted
  position, float and quantized, and the increase.
* **Top-1 agreement**: the share of those positions whose most likely next token is the float model's.
* **LSH bucket agreement**: the share of bucket ids -- every LSH layer, head, hash round and position -- equal to
  the float model's, and per layer. A moved bucket changes which keys a token attends to.

Text (``QualityCheck``): the caller's token ids (``reformer-rt export --validation-text``), else for a byte-level
vocabulary the held-out part of the demo model's corpus (Python standard-library source,
``models.train_demo.corpus``), else random ids -- then bits per token measures how far the quantized model moves,
not how good either is. It is cut into ``windows`` evenly spaced windows of ``length`` tokens (a chunk multiple, so
nothing is padded), as ``train_demo.evaluate`` lays them out: 96 windows of 512 bytes give the demo model's
published 2.71 bits per character.

Bucket ids: the PyTorch model's are its LSH layers' query/key vectors (caught by a forward hook on each layer's
``query_key`` projection) hashed by the reference ``lsh_hash``; an ONNX graph's come from a validation copy whose
extra outputs are each LSH layer's sorted keys (bucket * L + position: the ``TopK`` values of its hashed branch),
from which bucket = key // L at position key % L. Windows of ``length <= lsh_attn_chunk_length`` are not hashed (HF's
short path): no bucket agreement then.

Threshold: validation fails when the quantized graph's bits per token exceed the float model's by more than
``max_bpc_increase`` (default ``MAX_BPC_INCREASE`` = 0.02 bits, the goal int8 was measured against: +0.003 on the
demo model). Agreement shares are reported, not gated: how many top-1 choices a model may flip depends on how
sure it is (a weak model's near-ties flip first), while bits per token weighs each flip by what it costs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from reformer_rt.models import Reformer
from reformer_rt.models.attention import LSHSelfAttention
from reformer_rt.models.fused import fused_attention
from reformer_rt.models.lsh import lsh_hash
from reformer_rt.models.tokenizer import ByteTokenizer

from .errors import ValidationError

MAX_BPC_INCREASE = 0.02
WINDOWS, WINDOW_LENGTH = 96, 512
BATCH = 8  # windows per forward pass

#: ids [N, L] -> (logits [N, L, vocab] float32, bucket ids [N, H, n_hashes, L] of each LSH layer, in layer order)
Forward = Callable[[np.ndarray], tuple[np.ndarray, list[np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class QualityCheck:
    """What a quantized export is measured on, and the limit it must keep (module docstring)."""

    text: Sequence[int] | None = None  # token ids; None: the default text for the model's vocabulary
    source: str = ""  # what ``text`` is, for the report
    windows: int = WINDOWS
    length: int = WINDOW_LENGTH
    max_bpc_increase: float = MAX_BPC_INCREASE


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A candidate against the float reference on the same windows."""

    positions: int  # predicted positions compared
    bits_reference: float  # bits per token of the float reference
    bits: float  # of the candidate
    top1_agreement: float
    bucket_agreement: float | None  # None: the windows were too short to hash
    bucket_agreement_per_layer: tuple[float, ...] = ()

    @property
    def increase(self) -> float:
        return self.bits - self.bits_reference

    def describe(self) -> str:
        buckets = "not hashed (windows within one chunk)" if self.bucket_agreement is None else (
            f"{100 * self.bucket_agreement:.1f} % (per LSH layer: "
            f"{' / '.join(f'{100 * a:.1f}' for a in self.bucket_agreement_per_layer)})")
        return (f"bits per token {self.bits_reference:.4f} -> {self.bits:.4f} ({self.increase:+.4f}); top-1 agreement "
                f"{100 * self.top1_agreement:.1f} %; LSH bucket ids equal {buckets}")


@dataclasses.dataclass(frozen=True)
class QualityResult:
    comparison: Comparison
    source: str
    windows: int
    length: int
    limit: float  # the largest increase of bits per token allowed

    @property
    def passed(self) -> bool:
        return self.comparison.increase <= self.limit

    def summary(self) -> str:
        return (f"{self.comparison.describe()}, on {self.windows} windows of {self.length} tokens of {self.source} "
                f"(limit: +{self.limit:g} bits per token)")


def check_quantized(proto: onnx.ModelProto, model: Reformer, check: QualityCheck, max_length: int) -> QualityResult:
    """The quantized graph ``proto`` against the float ``model`` on ``check``'s text (module docstring)."""
    ids, source = (np.asarray(check.text, dtype=np.int64), check.source or "the given text") \
        if check.text is not None else default_text(model.config.vocab_size)
    length = window_length(model, min(check.length, max_length))
    windows = text_windows(ids, check.windows, length)
    comparison = compare(torch_forward(model), graph_forward(proto), windows)
    return QualityResult(comparison, source, len(windows), length, check.max_bpc_increase)


def default_text(vocab_size: int) -> tuple[np.ndarray, str]:
    """Token ids to measure on when the caller gives none, and what they are."""
    tokenizer = ByteTokenizer()
    if vocab_size == tokenizer.vocab_size:
        from reformer_rt.models.train_demo import corpus

        try:
            held_out = corpus()[1]
        except SystemExit:  # a Python without its standard library's sources
            held_out = b""
        if held_out:
            ids = np.frombuffer(held_out, dtype=np.uint8).astype(np.int64) + tokenizer.offset
            return ids, "held-out Python source (the demo model's corpus)"
    ids = np.random.default_rng(0).integers(0, vocab_size, WINDOWS * WINDOW_LENGTH, dtype=np.int64)
    return ids, "random token ids (no text given: bits per token shows the change only; pass --validation-text)"


def window_length(model: Reformer, longest: int) -> int:
    """The longest chunk multiple <= ``longest`` (at least one multiple): windows the model runs unpadded."""
    multiple = model.config.chunk_multiple
    return max(multiple, longest // multiple * multiple)


def text_windows(ids: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` evenly spaced windows [count, length] of ``ids`` (as ``train_demo.evaluate`` places them)."""
    if ids.ndim != 1 or len(ids) < length + 1:
        raise ValidationError(f"validation text: {len(ids):,} tokens; expected at least {length + 1:,} (a window of "
                              f"{length} tokens, the model's chunk multiple) -- give a longer text")
    starts = np.linspace(0, len(ids) - length - 1, count).astype(np.int64)
    return np.stack([ids[start:start + length] for start in starts])


def compare(reference: Forward, candidate: Forward, windows: np.ndarray, batch: int = BATCH) -> Comparison:
    """``candidate`` against ``reference`` on ``windows`` [N, L], ``batch`` windows per forward pass."""
    nll_ref = nll = 0.0
    agree = positions = 0
    bucket_equal: list[int] = []
    bucket_total: list[int] = []
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        (ref_logits, ref_buckets), (logits, buckets) = reference(ids), candidate(ids)
        nll_ref += _nll(ref_logits, ids)
        nll += _nll(logits, ids)
        agree += int((ref_logits[:, :-1].argmax(-1) == logits[:, :-1].argmax(-1)).sum())
        positions += ids[:, 1:].size
        if len(ref_buckets) != len(buckets):
            raise RuntimeError(f"bucket ids of {len(buckets)} LSH layers; the reference has {len(ref_buckets)}")
        if not bucket_equal:
            bucket_equal, bucket_total = [0] * len(buckets), [0] * len(buckets)
        for layer, (expected, got) in enumerate(zip(ref_buckets, buckets)):
            bucket_equal[layer] += int((expected == got).sum())
            bucket_total[layer] += expected.size
    per_layer = tuple(equal / total for equal, total in zip(bucket_equal, bucket_total) if total)
    overall = sum(bucket_equal) / sum(bucket_total) if sum(bucket_total) else None
    bits = 1 / (positions * math.log(2))
    return Comparison(positions, nll_ref * bits, nll * bits, agree / positions, overall, per_layer)


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed -ln p(next token) over the windows' predicted positions (float64)."""
    log_probs = torch.log_softmax(torch.from_numpy(logits[:, :-1]).double(), dim=-1)
    return -float(log_probs.gather(-1, torch.from_numpy(ids[:, 1:]).unsqueeze(-1)).sum())


# -------------------------------------------------------------------------------------------------- PyTorch
def torch_forward(model: torch.nn.Module, fused: bool = False) -> Forward:
    """A PyTorch LM as a ``Forward``: its logits and each LSH layer's bucket ids. ``fused``: the CPU fast path
    (what the torch backend runs) instead of the reference formulation. Windows must carry no padding."""

    def forward(ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        buckets: list[np.ndarray] = []
        hooks = [layer.query_key.register_forward_hook(_bucket_hook(layer, buckets))
                 for layer in model.modules() if isinstance(layer, LSHSelfAttention)]
        try:
            with torch.inference_mode(), fused_attention(fused):
                logits = model(torch.from_numpy(ids)).float().numpy()
        finally:
            for hook in hooks:
                hook.remove()
        return logits, buckets

    return forward


def _bucket_hook(layer: LSHSelfAttention, into: list[np.ndarray]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        batch, length, _ = output.shape
        qk = output.view(batch, length, layer.heads, layer.head_dim).transpose(1, 2)  # [B,L,H*D] -> [B,H,L,D]
        if qk.shape[2] > layer.attrs.chunk_length:  # HF's short path does not hash
            mask = torch.ones(qk.shape[0], qk.shape[2], dtype=torch.int32)
            into.append(lsh_hash(qk.float(), layer.rotations, mask, layer.attrs).numpy())

    return hook


# ------------------------------------------------------------------------------------------------- the graph
def graph_forward(proto: onnx.ModelProto, threads: int = 0) -> Forward:
    """A portable-form graph in ONNX Runtime (CPU) as a ``Forward``, through ``with_bucket_outputs``."""
    import onnxruntime as ort

    probe, bucket_outputs = with_bucket_outputs(proto)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    primary = proto.graph.output[0].name

    def forward(ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *keys = session.run([primary, *bucket_outputs], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return logits, [_buckets_from_sorted_keys(k) for k in keys if k.size]

    return forward


def with_bucket_outputs(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of a portable graph whose extra outputs are each LSH layer's sorted keys [B, H, n_hashes, L] (int64;
    empty when the layer took the short path), and their names in layer order. Each LSH layer is an ``If`` whose
    ``else_branch`` hashes; its one ``TopK`` sorts bucket * L + position."""
    probe = copy.deepcopy(proto)
    names = []
    for node in probe.graph.node:
        if node.op_type != "If":
            continue
        branches = {attr.name: attr.g for attr in node.attribute}
        sorts = [n for n in branches["else_branch"].node if n.op_type == "TopK"]
        if len(sorts) != 1:
            raise RuntimeError(f"{node.name}: {len(sorts)} TopK nodes in the hashed branch; expected 1 (the sort)")
        keys = sorts[0].output[0] or f"{sorts[0].name}__sorted_keys"
        sorts[0].output[0] = keys
        branches["else_branch"].output.append(helper.make_tensor_value_info(keys, TensorProto.INT64, None))
        none = f"{node.name}__not_hashed"
        branches["then_branch"].node.append(helper.make_node(
            "Constant", [], [none], value=numpy_helper.from_array(np.zeros(0, dtype=np.int64))))
        branches["then_branch"].output.append(helper.make_tensor_value_info(none, TensorProto.INT64, None))
        name = f"{node.name}__lsh_sorted_keys"
        node.output.append(name)
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
        names.append(name)
    return probe, names


def _buckets_from_sorted_keys(keys: np.ndarray) -> np.ndarray:
    length = keys.shape[-1]
    buckets = np.empty_like(keys)
    np.put_along_axis(buckets, keys % length, keys // length, axis=-1)
    return buckets
