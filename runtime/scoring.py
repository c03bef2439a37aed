"""Scoring a corpus: the mean negative log-likelihood of one long token sequence, by the standard strided evaluation.

Reference: HF transformers' perplexity guide ("Perplexity of fixed-length models"). Windows of ``window`` tokens
start every ``stride`` tokens, the last one ending at the end of the sequence. Each window scores only the tokens
that the previous window did not reach (the first window: all but its first token, which has no context); the
result is the mean NLL over every scored token. With ``stride == window`` (the default) the windows do not overlap
and each window's first token is context only, exactly as in the guide; a smaller stride gives every scored token
at least ``window - stride`` tokens of context, at ``window / stride`` times the cost. The numbers equal
transformers' loss on the same windows (labels = the window's ids with the already scored positions set to -100).

Windows run through ``Session.run(..., outputs=["log_probs"])``, which reduces the logits per micro-batch: a file of
any length never holds more than one micro-batch's logits, and windows of one length bucket share micro-batches
under the batching contract (``batching.py``), each scored as if alone.

Per character and per byte: the mean bits per scored token times the file's tokens per character (or per UTF-8
byte). Tokens that are never scored (the file's first, and with ``stride == window`` each window's first) are so
counted at the mean rate rather than as free, and for a byte-level model on ASCII text bits per character, per byte
and per token are the same number. Token ids carry no characters: for ids only bits per token are given, and bits
per byte when the model's tokenizer is byte-level (each id is a byte).

Known limits: the whole sequence's ids are held in memory (8 bytes a token); ``log_probs`` are float32 per token,
summed in float64.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from reformer_rt.models import ConfigError, InputError, InputTypeError
from reformer_rt.models.tokenizer import ByteTokenizer

from .batching import bucket_length, sequences_per_batch
from .tokenizers import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from .session import Session


@dataclasses.dataclass(frozen=True)
class Window:
    """One window of the evaluation: tokens ``[start, end)`` run together; ``[first_scored, end)`` are scored."""

    start: int
    end: int
    first_scored: int

    @property
    def scored(self) -> int:
        return self.end - self.first_scored


def plan_windows(length: int, window: int, stride: int) -> list[Window]:
    """The windows over a ``length``-token sequence (HF's loop: ``begin`` every ``stride``, ``end = min(begin +
    window, length)``, score what lies past the previous ``end``), leaving out windows that score nothing (a
    one-token last window of a non-overlapping split)."""
    windows: list[Window] = []
    previous_end = 0
    for start in range(0, length, stride):
        end = min(start + window, length)
        first = max(previous_end, start + 1)  # a window's first token is never predicted: it has no context
        if first < end:
            windows.append(Window(start, end, first))
        previous_end = end
        if end == length:
            break
    return windows


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """What ``Session.score`` gives: ``nll`` is the mean negative log-likelihood in nats over ``scored_tokens``;
    ``characters`` / ``bytes`` are the text's (None for ids; ``bytes`` counts the ids of a byte-level model);
    ``seconds`` is the scoring's wall time, not opening the model."""

    tokens: int
    scored_tokens: int
    windows: int
    window: int
    stride: int
    nll: float
    characters: int | None
    bytes: int | None
    backend: str
    seconds: float

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_character(self) -> float | None:
        return None if not self.characters else self.bits_per_token * self.tokens / self.characters

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.bytes else self.bits_per_token * self.tokens / self.bytes

    def as_dict(self) -> dict[str, Any]:
        """Every field and derived figure, JSON-ready (None where a figure does not apply)."""
        return {"tokens": self.tokens, "characters": self.characters, "bytes": self.bytes,
                "scored_tokens": self.scored_tokens, "windows": self.windows, "window": self.window,
                "stride": self.stride, "nll": self.nll, "bits_per_token": self.bits_per_token,
                "bits_per_character": self.bits_per_character, "bits_per_byte": self.bits_per_byte,
                "perplexity": self.perplexity, "backend": self.backend, "seconds": round(self.seconds, 3)}


def score(session: Session, source: str | Sequence[int] | np.ndarray, window: int | None = None,
          stride: int | None = None, tokenizer: Tokenizer | None = None) -> ScoreResult:
    """``Session.score``: text (tokenized by ``tokenizer``, default the model's) or token ids, scored in windows."""
    if session.task != "lm" or not session.config.is_decoder:
        raise InputError(f"score: needs a causal language model; this is a {session.task} model"
                         f"{'' if session.config.is_decoder else ' that is not causal (is_decoder=false)'}, whose "
                         "logits for a position see the token they would predict")
    window, stride = check_window(window, stride, session.max_sequence_length)
    if isinstance(source, str):
        text = source
        tokenizer = tokenizer or _model_tokenizer(session, required=True)
        ids = _as_ids(_encode(tokenizer, text), session.config.vocab_size)
        characters, n_bytes = len(text), len(text.encode("utf-8"))
    else:
        ids = _as_ids(source, session.config.vocab_size)
        byte_level = tokenizer if tokenizer is not None else _model_tokenizer(session, required=False)
        characters = None
        n_bytes = int(np.count_nonzero(ids >= byte_level.offset)) if isinstance(byte_level, ByteTokenizer) else None
    if len(ids) < 2:
        raise InputError(f"score: got {len(ids)} token{'s' if len(ids) != 1 else ''}; expected at least 2 -- the "
                         "first token is context only, so there is nothing to score")
    windows = plan_windows(len(ids), window, stride)
    started = time.perf_counter()
    total = 0.0
    bar = tqdm(total=len(windows), desc="windows", unit="window", disable=True if not session.progress else None)
    with bar:
        for group in _groups(session, windows):
            rows = session.run([ids[w.start:w.end] for w in group], outputs=["log_probs"]).rows["log_probs"]
            for w, log_probs in zip(group, rows, strict=True):  # log_probs[t] = log p(ids[start + t + 1] | ...)
                total -= float(log_probs[w.first_scored - w.start - 1:].sum(dtype=np.float64))
            bar.update(len(group))
    scored = sum(w.scored for w in windows)
    return ScoreResult(tokens=len(ids), scored_tokens=scored, windows=len(windows), window=window, stride=stride,
                       nll=total / scored, characters=characters, bytes=n_bytes, backend=session.backend,
                       seconds=time.perf_counter() - started)


def check_window(window: int | None, stride: int | None, max_length: int | None) -> tuple[int, int]:
    """``(window, stride)`` with their defaults (the model's maximum length; no overlap), or one error saying what
    holds: ``1 <= stride <= window <= max_length``. ``max_length`` None (the model not yet open) checks the rest."""
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise InputTypeError(f"{name}: got {value!r}; expected an integer number of tokens")
    limit = max_length if max_length is not None else max(window or 1, stride or 1)
    checked_window = limit if window is None else int(window)
    checked_stride = checked_window if stride is None else int(stride)
    if not 1 <= checked_stride <= checked_window <= limit:
        given = ", ".join(f"{name} {value}" for name, value in (("window", window), ("stride", stride))
                          if value is not None)
        bound = "the model's maximum length" + (f", {max_length:,}" if max_length is not None else "")
        raise InputError(f"{given}: expected 1 <= stride <= window <= {bound}; the default window is that maximum "
                         "and the default stride the window (no overlap)")
    return checked_window, checked_stride


def _groups(session: Session, windows: list[Window]) -> Iterator[list[Window]]:
    """Consecutive windows of one length bucket, as many as one micro-batch holds: each ``run`` is one forward pass
    (so its log-probs come back as the bar advances) and the shorter last window runs on its own."""
    group: list[Window] = []
    for w in windows:
        bucket = bucket_length(session.config, w.end - w.start)
        if group and (bucket != bucket_length(session.config, group[0].end - group[0].start)
                      or len(group) >= sequences_per_batch(bucket, session.max_tokens_per_batch)):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def _model_tokenizer(session: Session, required: bool) -> Tokenizer | None:
    """The tokenizer stored with the model, found as ``reformer-rt run --text`` finds it; with ``required`` False,
    None where there is none (ids need no tokenizer)."""
    directory = session.path if session.path.is_dir() else None
    try:
        return load_tokenizer(directory, session.config)
    except ConfigError:
        if required:
            raise
        return None


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):  # a 100 MB corpus as a list of Python ints would take 3.6 GB
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + tokenizer.offset
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _as_ids(source: Any, vocab_size: int) -> np.ndarray:
    """Token ids as a flat int64 array in the vocabulary, or an error naming the first bad one."""
    if isinstance(source, (bytes, bytearray)):
        raise InputTypeError("score: got bytes; expected text (str) or token ids -- decode the file, or map the bytes "
                             "to the model's ids")
    if isinstance(source, Sequence) and any(isinstance(x, (bool, np.bool_)) for x in source):
        raise InputTypeError("ids: got a boolean (true/false) among the ids; expected integer token ids")
    try:
        ids = np.asarray(source)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"ids: cannot read them as a flat list of token ids ({exc})") from exc
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise InputError(f"ids: got shape {ids.shape}; expected one flat sequence of token ids (score each sequence "
                         "on its own, or concatenate them)")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InputTypeError(f"ids: got dtype {ids.dtype}; expected integer token ids")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size)) if ids.size else ()
    if len(bad):
        raise InputError(f"ids: token id {ids[bad[0]]} at position {bad[0]:,}; expected ids in [0, {vocab_size - 1}]")
    return ids.astype(np.int64)
