"""Streamed execution of long sequences on the torch backend and on ONNX Runtime, and the outputs computed piece by
piece from it.

A sequence of L positions runs layer by layer in pieces of positions (``reformer_rt.models.streamed`` has the
pieces and why each may be cut so), keeping only the two reversible streams [L, hidden] and, inside an LSH layer,
one head's qk, values and output [L, D] over the whole sequence:

* ``stream_hidden`` (the driver) lays out each piece's inputs -- a stretch of positions, a local piece's wrapped
  neighbour chunks, an LSH piece's rows in sorted order with their neighbours in the sorted concatenation of rounds
  -- sorts each head's buckets, puts attention rows back in original order, combines rounds and adds every piece's
  result into the streams in place. It works on numpy arrays, single-threaded, except for the gathers of qk and
  values into sorted order: the pieces do the arithmetic on their runtime's thread pool, and the driver's copies
  then never wait at a pool's barrier for a thread that a busy machine has descheduled (measured under load with
  torch's two-thread pool for all of them: about 20 % slower at 65,536 tokens). The gathers read rows scattered
  over the whole sequence, which past a few hundred thousand tokens come from memory, not cache: there torch's
  ``index_select`` on the pool keeps more reads in flight (``_gather``; measured on a quiet machine only).
* The sequence-long arrays are made once per sequence, their pages made resident at once (``_resident``).
* ``Streamer`` runs it for every row of a micro-batch and turns each piece of final hidden states into the outputs
  asked for, so no output needs more than a piece of [L, vocab] at once: ``logits`` / ``last_hidden_state``
  written piece by piece (into the caller's arrays when given: ``Session.run(..., out=...)``), ``logits_at_last``
  (the LM head at each row's last token only), ``token_log_probs`` and ``pooled_hidden`` (``outputs.py``).

Pieces run as ``TorchPieces`` (the torch backend, through ``TorchArrays``) or ``OnnxPieces``: one ONNX Runtime
session per piece graph and layer (``reformer_rt.export.pieces``, cached per config) with the checkpoint's weights.
Rows of at least ``STREAM_TOKENS`` padded positions run streamed (``streams``); shorter ones run the backend's
whole-sequence path, whose intermediates are small at those lengths.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from reformer_rt.models import Reformer, ReformerConfig, ReformerModel
from reformer_rt.models.attention import lsh_attrs
from reformer_rt.models.heads import HIDDEN_STATE, LAST_LOGITS, LM_LOGITS
from reformer_rt.models.lsh import lsh_sort
from reformer_rt.models.streamed import DEFAULT_PIECE, ModelWeights, TorchPieces, can_stream, piece_length

from .outputs import POOLED_HIDDEN, TOKEN_LOG_PROBS, next_token_log_probs

#: Padded length from which a row runs streamed (``STREAM_TOKENS_ENV`` overrides it). At 65,536 tokens the
#: whole-sequence paths hold about 15 KB per token, streamed about 4 KB, in the same time.
STREAM_TOKENS = 1 << 16
STREAM_TOKENS_ENV = "REFORMER_RT_STREAM_TOKENS"


def stream_tokens() -> int:
    """The padded length from which rows run streamed (``STREAM_TOKENS``, or ``$REFORMER_RT_STREAM_TOKENS``)."""
    value = os.environ.get(STREAM_TOKENS_ENV, "")
    return int(value) if value.strip().isdigit() else STREAM_TOKENS


def streams(config: ReformerConfig, length: int) -> bool:
    """Whether a micro-batch padded to ``length`` runs streamed."""
    return length >= stream_tokens() and can_stream(config, length)


# ------------------------------------------------------------------------------------------------------ pieces
class Pieces(Protocol):
    """The piece functions of ``reformer_rt.models.streamed`` on numpy arrays, each with one layer's (or head's)
    weights."""

    def embed(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray: ...

    def local_attention(self, layer: int, x: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray: ...

    def lsh_project(self, layer: int, head: int, x: np.ndarray,
                    mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def lsh_attend(self, qk: np.ndarray, v: np.ndarray, mask: np.ndarray,
                   positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def attention_output(self, layer: int, head: int, out: np.ndarray) -> np.ndarray: ...

    def feed_forward(self, layer: int, x: np.ndarray) -> np.ndarray: ...

    def final_norm(self, attn: np.ndarray, hidden: np.ndarray) -> np.ndarray: ...

    def lm_head(self, hidden: np.ndarray) -> np.ndarray: ...


class TorchArrays:
    """``Pieces`` over ``TorchPieces``: numpy in, torch (sharing the memory) inside, numpy out."""

    def __init__(self, model: Reformer) -> None:
        body = model if isinstance(model, ReformerModel) else model.reformer
        self._pieces = TorchPieces(body, getattr(model, "lm_head", None))

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._pieces, name)

        def call(*args: Any) -> Any:
            with torch.inference_mode():
                out = method(*(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args))
            return tuple(t.numpy() for t in out) if isinstance(out, tuple) else out.numpy()

        return call


class OnnxPieces:
    """``Pieces`` on ONNX Runtime: the piece graphs in ``directory`` (``export.pieces.export_pieces``), one session
    per layer (and LSH head) with the weights of ``model`` (a loaded checkpoint) written in."""

    def __init__(self, directory: Path, model: Reformer, threads: int = 0) -> None:
        import onnx

        from reformer_rt.export.pieces import PieceSession, flat, flat_names, read_manifest

        manifest = read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory}: no readable piece set")
        graphs = {name: onnx.load(str(directory / entry["file"])) for name, entry in manifest["graphs"].items()}

        def session(name: str, record: Any) -> PieceSession:
            arrays = [t.detach().contiguous().numpy() for t in flat(record)]
            return PieceSession(graphs[name], dict(zip(flat_names("w", record), arrays)), threads)

        body = model if isinstance(model, ReformerModel) else model.reformer
        weights = ModelWeights.of(body)
        kinds = body.config.attn_layers
        self._embed = session("embed", (weights.word, *weights.tables))
        self._attention = [[session("lsh_project", head) for head in w] if kind == "lsh" else
                           session("local_attention", w) for kind, w in zip(kinds, weights.attention)]
        self._output = [[session("attention_output", (head,)) for head in w] for w in weights.attention_output]
        self._feed_forward = [session("feed_forward", w) for w in weights.feed_forward]
        self._final = session("final_norm", weights.final_norm)
        self._attend = session("lsh_attend", ()) if "lsh_attend" in graphs else None
        head = getattr(model, "lm_head", None)
        self._lm_head = None if head is None else session("lm_head", (head.decoder.weight, head.decoder.bias))

    def embed(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._embed.run((ids, positions))[0]

    def local_attention(self, layer: int, x: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._attention[layer].run((x, mask, positions))[0]

    def lsh_project(self, layer: int, head: int, x: np.ndarray,
                    mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qk, v, buckets = self._attention[layer][head].run((x, mask))
        return qk, v, buckets

    def lsh_attend(self, qk: np.ndarray, v: np.ndarray, mask: np.ndarray,
                   positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, lse = self._attend.run((qk, v, mask, positions))
        return out, lse

    def attention_output(self, layer: int, head: int, out: np.ndarray) -> np.ndarray:
        return self._output[layer][head].run((out,))[0]

    def feed_forward(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self._feed_forward[layer].run((x,))[0]

    def final_norm(self, attn: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        return self._final.run((attn, hidden))[0]

    def lm_head(self, hidden: np.ndarray) -> np.ndarray:
        assert self._lm_head is not None, "lm_head asked of a model without one"
        return self._lm_head.run((hidden,))[0]


# ------------------------------------------------------------------------------------------------------ driver
def _resident(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A new array in memory of its own, apart from the heap, whose pages the kernel makes resident, zeroed, when it
    is made (``MAP_POPULATE``; ``np.empty`` where the platform has no such flag); its memory returns when the last
    view of it goes, so the memory model can count it as gone after the layers (``memory.footprint``).

    The driver writes every byte of each sequence-long array anyway, so it is resident by the peak either way; what
    changes is how: faulted in one page at a time as first written (``np.empty`` asks for 2 MB pages on such
    arrays), in a virtual machine each new page also costs the host a fault. Measured on this project's machine
    (a KVM guest, AMD EPYC, 2 cores): 2 GB written after ``np.empty`` in 2.4-3.7 s, after ``MAP_POPULATE`` in
    0.83-0.88 s; one ONNX Runtime forward pass over 524,288 tokens spent 4.9 s of its 43 s first-touching the LSH
    layers' head arrays (made once per layer then, with ``np.empty``)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate:
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(memory, dtype).reshape(shape)


def _spans(length: int, piece: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, piece):
        yield start, min(start + piece, length)


def _stretch(start: int, end: int, chunk: int, before: int, after: int, n_chunks: int) -> np.ndarray:
    """Row indices [n_ext * chunk] of chunks start//chunk - before .. end//chunk + after, wrapped modulo ``n_chunks``
    (how ``look_around`` sees a sequence, or the sorted concatenation of rounds)."""
    chunks = np.arange(start // chunk - before, end // chunk + after) % n_chunks
    return (chunks[:, None] * chunk + np.arange(chunk)).ravel()


def stream_hidden(pieces: Pieces, config: ReformerConfig, ids: np.ndarray, mask: np.ndarray,
                  piece: int = DEFAULT_PIECE) -> Iterator[tuple[int, np.ndarray]]:
    """The final hidden states of one padded sequence -- ids [L] int64, mask [L] int32 (1 = token) -- as (start,
    [C, 2*hidden] float32) pieces in order. Equal to ``ReformerModel`` in ``fused_attention()`` to float32 rounding
    (the heads' output projections are summed per head)."""
    length = ids.shape[0]
    if not can_stream(config, length):
        raise ValueError(f"stream_hidden: got L={length}; expected a multiple of {config.chunk_multiple} above every "
                         "chunk length (shorter sequences run the model's forward)")
    spans = list(_spans(length, piece_length(config, piece)))
    positions = np.arange(length, dtype=np.int64)
    attn = _resident((length, config.hidden_size), np.float32)
    hidden = _resident((length, config.hidden_size), np.float32)
    for start, end in spans:
        attn[start:end] = hidden[start:end] = pieces.embed(ids[start:end], positions[start:end])
    arrays = _HeadArrays(config, length, spans[0][1]) if "lsh" in config.attn_layers else None
    for layer, kind in enumerate(config.attn_layers):
        if kind == "local":
            _local_layer(pieces, config, layer, attn, hidden, mask, positions, spans)
        else:
            assert arrays is not None
            _lsh_layer(pieces, config, layer, attn, hidden, mask, spans, arrays)
        for start, end in spans:  # Y2 = X2 + FeedForward(Y1)
            hidden[start:end] += pieces.feed_forward(layer, attn[start:end])
    del arrays
    for start, end in spans:
        yield start, pieces.final_norm(attn[start:end], hidden[start:end])


def _local_layer(pieces: Pieces, config: ReformerConfig, layer: int, attn: np.ndarray, hidden: np.ndarray,
                 mask: np.ndarray, positions: np.ndarray, spans: list[tuple[int, int]]) -> None:
    """Y1 = X1 + LocalAttention(X2), a piece of whole chunks and its neighbours at a time: a view of the streams
    where they lie inside the sequence, gathered with wrapping at its ends."""
    chunk = config.local_attn_chunk_length
    before, after = config.local_num_chunks_before, config.local_num_chunks_after
    length = hidden.shape[0]
    for start, end in spans:
        low, high = start - before * chunk, end + after * chunk
        rows: slice | np.ndarray = (slice(low, high) if low >= 0 and high <= length else
                                    _stretch(start, end, chunk, before, after, length // chunk))
        x = hidden[rows].reshape(-1, chunk, hidden.shape[1])
        attn[start:end] += pieces.local_attention(layer, x, mask[rows].reshape(-1, chunk),
                                                  positions[rows].reshape(-1, chunk))


class _HeadArrays:
    """One LSH head's sequence-long arrays, made once per sequence and reused by every head of every LSH layer, and
    one piece's gathered rows. Made per layer instead, a process that returns freed memory (ONNX Runtime's) faulted
    them in afresh for each LSH layer, and made per head, a process that keeps it (the torch backend) held the next
    head's rounds beside the last one's. Measured (crime-and-punishment-1m, one fresh process per point, AMD EPYC,
    2 cores, ``reformer-rt bench``): ONNX Runtime over 1,048,576 tokens in 70.5 s and 4,821 MB against 97.3 s and
    4,780 MB in an earlier run with arrays made per layer (and numpy's fancy indexing for the gathers, a sort of
    bucket * L + position); torch over 524,288 tokens in 42.1 s and 3,481 MB against 44.2 s and 3,340 MB in the
    same hour: what the heads' arrays keep through the local and feed-forward layers, torch's heap no longer lends
    to their pieces."""

    def __init__(self, config: ReformerConfig, length: int, piece: int) -> None:
        attrs = lsh_attrs(config)
        dim, n_hashes = config.attention_head_size, attrs.num_hashes
        self.qk = _resident((length, dim), np.float32)
        self.v = _resident((length, dim), np.float32)
        self.buckets = np.empty((n_hashes, length), dtype=_bucket_dtype(attrs.num_buckets))
        self.rounds_out = _resident((n_hashes * length, dim), np.float32)
        self.rounds_lse = np.empty(n_hashes * length, dtype=np.float32)
        self.combined = _resident((length, dim), np.float32) if n_hashes > 1 else self.rounds_out[:length]
        rows = piece + (attrs.chunks_before + attrs.chunks_after) * attrs.chunk_length
        self.qk_rows = torch.empty((rows, dim), dtype=torch.float32)  # qk's and v's type, whatever torch's default
        self.v_rows = torch.empty((rows, dim), dtype=torch.float32)


def _bucket_dtype(num_buckets: int) -> type:
    """The narrowest type for buckets 0 .. num_buckets (the last one is padding's): numpy sorts 16-bit integers by
    radix, in time linear in their number."""
    return np.uint16 if num_buckets <= np.iinfo(np.uint16).max else np.int64


def _sort_order(buckets: np.ndarray) -> np.ndarray:
    """Row i of the sorted concatenation of rounds holds position order[i] [n_hashes * L]: each round's positions by
    bucket, then by position (``lsh.lsh_sort``). A stable sort of the buckets alone keeps equal buckets in position
    order; 16-bit buckets sort by radix (524,288 tokens: 5 ms a head, against 45 ms for ``lsh_sort``'s sort of
    bucket * L + position, which wider buckets use)."""
    if buckets.dtype == np.uint16:
        return np.argsort(buckets, axis=-1, kind="stable").ravel()
    return lsh_sort(torch.from_numpy(buckets)).numpy().ravel()


def _gather(source: np.ndarray, rows: torch.Tensor, out: torch.Tensor) -> np.ndarray:
    """source[rows] written into ``out`` (its first len(rows) rows) and given back as numpy: ``index_select`` on
    torch's thread pool. Measured on this project's machine (2 cores), in a forward pass over 524,288 tokens on ONNX
    Runtime: 0.71 s for every LSH gather of qk and values, against 1.8 s with numpy's ``take`` (one thread) and 2.4 s
    with fancy indexing (which also makes a new array each time)."""
    part = out[:rows.shape[0]]
    torch.index_select(torch.from_numpy(source), 0, rows, out=part)
    return part.numpy()


def _lsh_layer(pieces: Pieces, config: ReformerConfig, layer: int, attn: np.ndarray, hidden: np.ndarray,
               mask: np.ndarray, spans: list[tuple[int, int]], arrays: _HeadArrays) -> None:
    """Y1 = X1 + LSHAttention(X2), one head at a time: hash per piece, sort per round (``lsh.lsh_sort``: by bucket,
    then position), attend per piece of sorted chunks, put back in original order, combine rounds, add the head's
    share of the output projection."""
    attrs = lsh_attrs(config)
    length, dim = hidden.shape[0], config.attention_head_size
    chunk, n_hashes = attrs.chunk_length, attrs.num_hashes
    piece = spans[0][1]
    qk, v, buckets = arrays.qk, arrays.v, arrays.buckets
    rounds_out, rounds_lse = arrays.rounds_out, arrays.rounds_lse
    for head in range(config.num_attention_heads):
        for start, end in spans:
            qk[start:end], v[start:end], buckets[:, start:end] = pieces.lsh_project(
                layer, head, hidden[start:end], mask[start:end])
        order = _sort_order(buckets)
        n_sorted = n_hashes * length // chunk
        for start, end in _spans(n_hashes * length, piece):
            rows = order[_stretch(start, end, chunk, attrs.chunks_before, attrs.chunks_after, n_sorted)]
            picked = torch.from_numpy(rows)
            got, lse = pieces.lsh_attend(_gather(qk, picked, arrays.qk_rows).reshape(-1, chunk, dim),
                                         _gather(v, picked, arrays.v_rows).reshape(-1, chunk, dim),
                                         mask[rows].reshape(-1, chunk), rows.reshape(-1, chunk))
            targets = order[start:end] + np.arange(start, end) // length * length  # -> (round, position)
            rounds_out[targets] = got
            rounds_lse[targets] = lse
        del order
        out = arrays.combined
        if n_hashes > 1:
            _combine_rounds(rounds_out, rounds_lse, n_hashes, spans, out)
        for start, end in spans:
            attn[start:end] += pieces.attention_output(layer, head, out[start:end])


def _combine_rounds(out: np.ndarray, lse: np.ndarray, n_hashes: int, spans: list[tuple[int, int]],
                    combined: np.ndarray) -> None:
    """Semantics step 6 of ``lsh.py``, per piece of positions: rounds [n_hashes*L, D] weighted by the softmax over
    rounds of their logsumexp [n_hashes*L] -> ``combined`` [L, D]."""
    length = out.shape[0] // n_hashes
    out, lse = out.reshape(n_hashes, length, -1), lse.reshape(n_hashes, length, 1)
    for start, end in spans:
        part = lse[:, start:end]
        top = part.max(axis=0)
        total = top + np.log(np.exp(part - top).sum(axis=0))
        combined[start:end] = (out[:, start:end] * np.exp(part - total)).sum(axis=0)


# ----------------------------------------------------------------------------------------------------- outputs
#: Raw outputs a streamed run gives: per task (an LM's head, every model's hidden state) and the reductions.
STREAM_OUTPUTS = {"lm": (LM_LOGITS.name, LAST_LOGITS.name, TOKEN_LOG_PROBS, HIDDEN_STATE.name, POOLED_HIDDEN),
                  "base": (HIDDEN_STATE.name, POOLED_HIDDEN)}
Destinations = dict[str, list[np.ndarray]]  # raw output -> one array per row, [n_i, X] (n_i: the row's tokens)


class Streamer:
    """Streamed forward passes of a micro-batch's rows, one row at a time, and their outputs (module docstring)."""

    def __init__(self, pieces: Pieces, config: ReformerConfig, task: str, piece: int = DEFAULT_PIECE) -> None:
        self.pieces, self.config, self.task, self.piece = pieces, config, task, piece
        self.outputs: tuple[str, ...] = STREAM_OUTPUTS.get(task, ())

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: tuple[str, ...],
            out: Destinations | None = None) -> dict[str, Any]:
        """int64 [B, L] ids and mask -> {name: [B, ...] array} for each raw output in ``outputs``; an output with
        destinations in ``out`` is written there instead and given back as that list of rows."""
        batch, length = input_ids.shape
        results: dict[str, Any] = {name: out[name] if out is not None and name in out else
                                   np.zeros(self._shape(name, batch, length), dtype=np.float32) for name in outputs}
        for row in range(batch):
            self._run_row(input_ids[row], attention_mask[row], {name: value[row] for name, value in results.items()})
        return results

    def _shape(self, name: str, batch: int, length: int) -> tuple[int, ...]:
        vocab, width = self.config.vocab_size, 2 * self.config.hidden_size
        return {LM_LOGITS.name: (batch, length, vocab), LAST_LOGITS.name: (batch, 1, vocab),
                TOKEN_LOG_PROBS: (batch, length), HIDDEN_STATE.name: (batch, length, width),
                POOLED_HIDDEN: (batch, 2, width)}[name]

    def _run_row(self, ids: np.ndarray, mask: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        tokens = max(int(np.count_nonzero(mask)), 1)  # ones come first (right padding)
        total = np.zeros(2 * self.config.hidden_size, dtype=np.float64)
        needs_logits = LM_LOGITS.name in rows or TOKEN_LOG_PROBS in rows
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        for start, hidden in stream_hidden(self.pieces, self.config, ids, mask.astype(np.int32), self.piece):
            end = min(start + hidden.shape[0], tokens)
            if start >= end:
                continue  # padding only
            hidden = hidden[:end - start]
            if HIDDEN_STATE.name in rows:
                rows[HIDDEN_STATE.name][start:end] = hidden
            if POOLED_HIDDEN in rows:
                total += hidden.sum(axis=0, dtype=np.float64)
                if end == tokens:
                    rows[POOLED_HIDDEN][1] = hidden[-1]
            if LAST_LOGITS.name in rows and end == tokens:
                rows[LAST_LOGITS.name][0] = self.pieces.lm_head(hidden[-1:])[0]
            if needs_logits:
                logits = self.pieces.lm_head(hidden)
                if LM_LOGITS.name in rows:
                    rows[LM_LOGITS.name][start:end] = logits
                scored = min(end, tokens - 1) - start  # positions with a next token
                if TOKEN_LOG_PROBS in rows and scored > 0:
                    rows[TOKEN_LOG_PROBS][start:start + scored] = next_token_log_probs(
                        logits[:scored], ids[start + 1:start + 1 + scored])
        if POOLED_HIDDEN in rows:
            rows[POOLED_HIDDEN][0] = total / tokens
