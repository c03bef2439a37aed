"""The outputs a caller can ask a Session (and the server) for, each derived from one raw backend output.

Raw outputs are what a backend computes for a micro-batch (the task table, ``reformer_rt.models.heads.TASKS``:
per position [B, L, ...] or per sequence [B, ...]); output kinds are what callers name. Every raw output a graph
gives is a kind under its graph name, passed through as it is; the other kinds are computed from one (the table
below). Which kinds a model offers follows from its raw outputs, so one name can mean what the model's task makes
of it (``logits``: an LM's per-position logits, a classifier's class logits):

| name              | task           | from              | per sequence of n tokens        | dtype   |
|-------------------|----------------|-------------------|---------------------------------|---------|
| logits            | lm             | logits            | [n, vocab]                      | float32 |
| last_logits       | lm             | logits            | [vocab], position n-1           | float32 |
| top_k_ids         | lm             | logits            | [k], position n-1, best first   | int64   |
| top_k_log_probs   | lm             | logits            | [k], their log-probabilities    | float32 |
| log_probs         | lm             | logits            | [n-1]: log p(id[t+1] | id[..t]) | float32 |
| logits            | classification | class_logits      | [num_labels]                    | float32 |
| probabilities     | classification | class_logits      | [num_labels]: softmax (sigmoid for multi-label) | float32 |
| start_logits      | question_ans.  | start_logits      | [n]                             | float32 |
| end_logits        | question_ans.  | end_logits        | [n]                             | float32 |
| last_hidden_state | any (torch)    | last_hidden_state | [n, 2*hidden]                   | float32 |
| embedding         | any (torch)    | last_hidden_state | [2*hidden], mean or last        | float32 |

Whole-sequence logits of long inputs are large (1,048,576 tokens x 320 vocab = 1.34 GB in float32); the reduced
outputs are computed per micro-batch, so asking only for them never holds every sequence's logits at once. Where
the backend gives a cheaper raw output for a kind (``OutputKind.alternatives``) it is used instead: the last
position's logits alone (``logits_at_last``), the next-token log-probabilities or the pooled hidden states that a
streamed run (``streaming.py``) and the torch backend compute piece by piece (``token_log_probs``,
``pooled_hidden``), so those outputs never hold [L, vocab] or [L, 2*hidden] at all. Options: ``top_k`` (how many of the last position's best ids, default 5), ``pooling``
(``mean`` over the sequence's tokens or its ``last`` token, default mean); ``problem_type`` is the model's (HF's
config field), set by the Session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from reformer_rt.models import InputError, ReformerConfig
from reformer_rt.models.heads import CLASS_LOGITS, HIDDEN_STATE, LAST_LOGITS, LM_LOGITS, TASKS, RawOutput

POOLINGS = ("mean", "last")
DEFAULT_TOP_K = 5
#: Raw outputs beyond the task table's, from streamed runs and the torch backend: per position [B, L] float32,
#: log p(id[t+1] | id[..t]) at t (0 at a row's last token); per sequence [B, 2, 2*hidden], the mean of the final
#: hidden states over the row's tokens and the last token's.
TOKEN_LOG_PROBS, POOLED_HIDDEN = "token_log_probs", "pooled_hidden"
PER_POSITION = {TOKEN_LOG_PROBS: True, POOLED_HIDDEN: False}


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    top_k: int = DEFAULT_TOP_K
    pooling: str = "mean"
    problem_type: str | None = None  # the model's, for probabilities

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InputError(f"top_k: got {self.top_k!r}; expected an integer >= 1")
        if self.pooling not in POOLINGS:
            raise InputError(f"pooling: got {self.pooling!r}; expected one of {POOLINGS}")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _top_k_ids(row: np.ndarray, ids: np.ndarray, options: OutputOptions) -> np.ndarray:
    return _top_k(row, options.top_k)[0]


def _top_k_log_probs(row: np.ndarray, ids: np.ndarray, options: OutputOptions) -> np.ndarray:
    return _top_k(row, options.top_k)[1]


def _top_k(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and log-probabilities of the ``k`` largest last-position logits, best first (ties: lower id)."""
    log_probs = _log_softmax(row[-1])
    k = min(k, log_probs.shape[0])
    order = np.argsort(-log_probs, kind="stable")[:k]
    return order.astype(np.int64), log_probs[order].astype(np.float32)


def next_token_log_probs(logits: np.ndarray, next_ids: np.ndarray) -> np.ndarray:
    """log p(next_ids[t]) under logits[t] [n, vocab] (a float64 log-softmax), as float32 [n]."""
    log_probs = _log_softmax(logits)
    return log_probs[np.arange(len(next_ids)), next_ids].astype(np.float32)


def _token_log_probs(row: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(ids) < 2:
        return np.zeros(0, dtype=np.float32)
    return next_token_log_probs(row[:len(ids) - 1], ids[1:])


def _probabilities(logits: np.ndarray, problem_type: str | None) -> np.ndarray:
    if problem_type == "regression":
        raise InputError("probabilities: this is a regression head (problem_type 'regression'); ask for logits")
    if problem_type == "multi_label_classification":
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    return np.exp(_log_softmax(logits)).astype(np.float32)


Reducer = Callable[[np.ndarray, np.ndarray, OutputOptions], np.ndarray]


class Alternative(NamedTuple):
    """A cheaper raw output a kind can be computed from, and how."""

    source: str
    reduce: Reducer


@dataclasses.dataclass(frozen=True)
class OutputKind:
    name: str
    source: str  # the raw output it is computed from
    dtype: type
    dims: tuple[str, ...]  # symbolic per-sequence dims: "n" tokens, "n-1", "vocab", "hidden", "labels", "k"
    reduce: Reducer  # (raw row: [n, X] per position or [X] per sequence, ids [n], options) -> the output
    doc: str
    #: Raw outputs that give the same result for less, preferred in order when available.
    alternatives: tuple[Alternative, ...] = ()

    @property
    def passed_through(self) -> bool:
        """Whether it is a raw output as it is (the only kind that can be written into a caller's array)."""
        return self.reduce is _same

    def route(self, raw_outputs: tuple[str, ...]) -> Alternative | None:
        """(source, reduce) this kind is computed by from these raw outputs: the first alternative given, else its
        own source; None when neither is."""
        for alternative in self.alternatives:
            if alternative.source in raw_outputs:
                return alternative
        return Alternative(self.source, self.reduce) if self.source in raw_outputs else None

    def shape(self, config: ReformerConfig) -> list[int]:
        """Per-sequence shape with -1 for what varies per request (KServe model metadata)."""
        sizes = {"vocab": config.vocab_size, "hidden": 2 * config.hidden_size, "labels": config.num_labels}
        return [sizes.get(d, -1) for d in self.dims]


def _same(row: np.ndarray, ids: np.ndarray, options: OutputOptions) -> np.ndarray:
    return row


def _last(row: np.ndarray, ids: np.ndarray, options: OutputOptions) -> np.ndarray:
    return row[-1]


def _at_last(reduce: Reducer) -> tuple[Alternative, ...]:
    """The LM head at the last position only (``logits_at_last`` [1, vocab]) gives a last-position output."""
    return (Alternative(LAST_LOGITS.name, reduce),)


def passed_through(raw: RawOutput) -> OutputKind:
    """The kind that gives ``raw`` as it is, under its graph name."""
    dims = (("n",) if raw.per_position else ()) + ((raw.width,) if raw.width != "none" else ())
    return OutputKind(raw.exported_name, raw.name, np.float32, dims, _same, raw.doc)


#: The kinds computed from a raw output, by its name.
DERIVED_KINDS: dict[str, tuple[OutputKind, ...]] = {
    LM_LOGITS.name: (
        OutputKind("last_logits", LM_LOGITS.name, np.float32, ("vocab",), _last,
                   "logits of the last position (the next-token distribution)", _at_last(_last)),
        OutputKind("top_k_ids", LM_LOGITS.name, np.int64, ("k",), _top_k_ids,
                   "the top_k most likely next tokens, best first", _at_last(_top_k_ids)),
        OutputKind("top_k_log_probs", LM_LOGITS.name, np.float32, ("k",), _top_k_log_probs,
                   "log-probabilities of top_k_ids", _at_last(_top_k_log_probs)),
        OutputKind("log_probs", LM_LOGITS.name, np.float32, ("n-1",), lambda row, ids, o: _token_log_probs(row, ids),
                   "log p(id[t+1] | id[..t]) of the given ids (scoring)",
                   (Alternative(TOKEN_LOG_PROBS, lambda row, ids, o: row[:max(len(ids) - 1, 0)]),))),
    CLASS_LOGITS.name: (
        OutputKind("probabilities", CLASS_LOGITS.name, np.float32, ("labels",),
                   lambda row, ids, o: _probabilities(row, o.problem_type),
                   "class probabilities: softmax, or sigmoid for a multi-label head"),),
    HIDDEN_STATE.name: (
        OutputKind("embedding", HIDDEN_STATE.name, np.float32, ("hidden",),
                   lambda row, ids, o: row.mean(axis=0) if o.pooling == "mean" else row[-1],
                   "one vector per sequence: mean over its tokens, or its last token (pooling)",
                   (Alternative(POOLED_HIDDEN, lambda row, ids, o: row[POOLINGS.index(o.pooling)]),)),),
}
#: Every kind, in the order models list them: per graph output of each task, itself then what is computed from
#: it; the hidden state (which the PyTorch model gives for every task) last.
_GRAPH_OUTPUTS = {raw.name: raw for task in TASKS.values() for raw in task.graph if raw.name != HIDDEN_STATE.name}
OUTPUT_KINDS: tuple[OutputKind, ...] = tuple(
    kind for raw in (*_GRAPH_OUTPUTS.values(), HIDDEN_STATE)
    for kind in (passed_through(raw), *DERIVED_KINDS.get(raw.name, ())))


@dataclasses.dataclass(frozen=True)
class SequenceJob:
    """One checked sequence and the outputs its caller wants from it."""

    sequence: np.ndarray  # int64 token ids
    kinds: tuple[OutputKind, ...]
    options: OutputOptions
    #: Per-position outputs to write into the caller's arrays (``Session.run(..., out=...)``): name -> [n, X].
    out: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def pad_stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Per-sequence arrays [n_i, *rest] -> [N, max n_i, *rest], zero-padded (equal shapes simply stack)."""
    longest = max(a.shape[0] for a in arrays)
    out = np.zeros((len(arrays), longest, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return out


def available_outputs(raw_outputs: tuple[str, ...]) -> tuple[str, ...]:
    """The output kinds a backend with these raw outputs can give, in table order."""
    return tuple(dict.fromkeys(kind.name for kind in OUTPUT_KINDS if kind.route(raw_outputs) is not None))


def output_kind(name: str, raw_outputs: tuple[str, ...]) -> OutputKind:
    """The kind called ``name`` that these raw outputs can give (``route`` says from which), or an error listing
    what this model gives."""
    named = [kind for kind in OUTPUT_KINDS if kind.name == name]
    for kind in named:
        if kind.route(raw_outputs) is not None:
            return kind
    why = "unknown output" if not named else (
        f"needs {' or '.join(k.source for k in named)}, which this model does not give (an ONNX file or engine "
        "holds only the outputs it was exported with; a checkpoint directory on the torch backend gives every "
        "output of its model)")
    raise InputError(f"output {name!r}: {why}; expected one of {list(available_outputs(raw_outputs))}")
