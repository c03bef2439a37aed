"""The memory model: how many bytes one ``Session.run`` needs, predicted before anything is allocated, and how many
this process may still take -- so that a call (or a served request) that cannot fit is refused with a way out
instead of being killed by the kernel half-way.

Predicted peak resident bytes = ``base`` (the process's resident set when the Session opened: ``resident_bytes``) + the
largest micro-batch's working set (below) + the outputs held in memory until the call returns. Micro-batches run
in order and each one's in-memory outputs stay until the end, so the peak is taken over the plan as it runs.

Working set of one micro-batch of B rows padded to L, in bytes (``itemsize`` 4 for float32):

* streamed (``streaming.py``; rows of >= 65,536 padded tokens, a CPU float32 checkpoint, one row at a time) --
  derived from the driver's own buffers: per token of the row, the two streams (2 x hidden x 4), the ids and mask
  (8 + 8 per token of the whole batch; 8 for the checked ids, 4 + 8 for the row's int32 mask and positions), and
  the LSH layers' sequence-long arrays (one head's qk and v, 2 x D x 4; the buckets and sort index, 8 x n_hashes;
  the rounds' outputs and logsumexp, (D + 1) x n_hashes x 4), which the outputs kept in memory replace when larger:
  those become resident as the last stage writes them, after the LSH arrays are unmapped; plus one piece's own
  intermediates, a constant ``STREAM_PIECE_BYTES_PER_POSITION`` x the piece (measured: it is the attention's chunk
  scores and copies, which the piece functions leave to their runtime).
* whole sequence (the backend's forward over [B, L]) -- the reversible streams, old and new (4 x hidden x 4 per
  token), plus ``WHOLE_LAYER_COPIES[backend]`` copies of one layer's per-head vectors and chunk scores
  (H x n_hashes x (D + chunk x (1 + before + after)) x 4), measured per backend, plus the raw outputs the backend
  returns for the batch (an LM's logits, L x vocab x 4, whatever the caller asked).

Outputs held: ``logits`` L x vocab x 4 and ``last_hidden_state`` L x 2*hidden x 4 per sequence when they come back
in memory -- nothing when the caller gives ``out=`` (a memory map: the kernel writes it back as it goes); on the
whole path they are views of the batch's raw output, which then stays.

float16 (torch on CUDA) halves the itemsize of activations and outputs: that is what the formulas say, not what has
been measured -- no GPU run has confirmed it, and a GPU's memory is the allocator's, not this process's RSS.

Memory available: the smallest of the cgroup's limit minus its usage (v2 ``memory.max``/``memory.current``, v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``; reclaimable page cache counted as free), ``/proc/meminfo``'s
``MemAvailable``, and ``$REFORMER_RT_MEMORY_LIMIT`` (bytes, or "2GB", "512MiB": a cap on what one call may add;
read when a Session opens). Coefficients were measured on an AMD EPYC (2 cores), crime-and-punishment, torch 2.13,
onnxruntime 1.32 (README, "Memory model").
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from reformer_rt.models import InputError, ReformerConfig

from .backends import FEED_FORWARD_CHUNK

MEMORY_LIMIT_ENV = "REFORMER_RT_MEMORY_LIMIT"
#: Resident bytes of a CPU process with the Session open, before any forward pass (imports, weights, the runtime's
#: sessions): measured with a crime-and-punishment checkpoint (13.8 MB of weights).
BASE_BYTES = {"torch": 287_000_000, "onnxruntime": 338_000_000}
#: One piece's intermediates per position of the piece (streamed path), measured; on ONNX Runtime it includes the
#: piece graphs' sessions, opened with the first streamed row. On torch, the middle of repeated runs' spread: the one
#: heap every thread shares (``backends.reuse_freed_memory``) fragments differently from run to run (the same spread
#: with one thread, without huge pages, without address randomisation) -- a 32,768-token streamed call peaked between
#: 907 and 1,025 MB over five runs (with the LSH head arrays in that heap, before they were mapped apart: 850 to
#: 1,017 MB over 38 runs, 1,072 once).
STREAM_PIECE_BYTES_PER_POSITION = {"torch": 17_500, "onnxruntime": 16_800}
#: Copies of one layer's per-head vectors and chunk scores alive at the whole path's peak, measured.
WHOLE_LAYER_COPIES = {"torch": 7.9, "onnxruntime": 8.7}
#: The whole path's chunked feed-forward and LM head (``backends.FEED_FORWARD_CHUNK`` positions at a time): copies of
#: a chunk's (feed_forward + vocab + hidden) floats alive at the peak, measured (ONNX Runtime runs them unchunked:
#: inside its per-token figure).
WHOLE_CHUNK_COPIES = {"torch": 3.1, "onnxruntime": 0.0}
_ITEMSIZE = {"float32": 4, "float16": 2}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """What the model needs to know of one call: the session's facts and the call's micro-batches."""

    config: ReformerConfig
    backend: str  # "torch" or "onnxruntime" (others are predicted as onnxruntime: their own runtimes differ)
    dtype: str
    stream_from: int | None  # padded length from which rows run streamed; None: never on this session
    piece: int  # positions per streamed piece
    batches: Sequence[tuple[int, int]]  # (rows, padded length) per micro-batch, in the order they run
    raw_width: int  # floats per position the whole path's raw outputs hold (an LM's logits: vocab)
    held_width: int  # floats per position of the outputs returned in memory (0: every one written to ``out=``)
    base: int | None = None  # the process's resident bytes with the session open (``resident_bytes``); None: estimate


@dataclasses.dataclass(frozen=True)
class Footprint:
    """A call's predicted peak: ``base + working`` (the working set at the peak, outputs held by then included)."""

    base: int
    working: int

    @property
    def peak(self) -> int:
        return self.base + self.working


def _key(backend: str) -> str:
    return backend if backend in BASE_BYTES else "onnxruntime"


def stream_bytes_per_token(config: ReformerConfig) -> int:
    """Bytes per token of a streamed row's sequence-long arrays at their high point (module docstring), float32: the
    two streams, the ids and mask, and the LSH head arrays (``streaming._HeadArrays``, made once per sequence and
    reused by every head): qk, v, the buckets and sort index, the rounds' outputs and logsumexp and, with several
    rounds, their combination."""
    dim, n_hashes = config.attention_head_size, config.num_hashes
    lsh = 2 * dim * 4 + 8 * n_hashes + (dim + 1) * n_hashes * 4 + (dim * 4 if n_hashes > 1 else 0)
    return 2 * config.hidden_size * 4 + 8 + 12 + (lsh if "lsh" in config.attn_layers else 0)


def layer_bytes_per_token(config: ReformerConfig, itemsize: int = 4) -> int:
    """One layer's per-head vectors and chunk scores per token (the whole path's unit, module docstring)."""
    widest = 0
    for kind in set(config.attn_layers):
        if kind == "lsh":
            chunk, around, rounds = (config.lsh_attn_chunk_length, 1 + config.lsh_num_chunks_before
                                     + config.lsh_num_chunks_after, config.num_hashes)
        else:
            chunk, around, rounds = (config.local_attn_chunk_length, 1 + config.local_num_chunks_before
                                     + config.local_num_chunks_after, 1)
        widest = max(widest, config.num_attention_heads * rounds * (config.attention_head_size + chunk * around))
    return widest * itemsize


def footprint(plan: PassPlan) -> Footprint:
    """The predicted peak of one call (module docstring): the one function Session, serve and the README use."""
    key, itemsize = _key(plan.backend), _ITEMSIZE[plan.dtype]
    config = plan.config
    base = BASE_BYTES[key] if plan.base is None else plan.base
    held = peak = 0
    for rows, length in plan.batches:
        tokens = rows * length
        outputs = tokens * plan.held_width * itemsize
        if plan.stream_from is not None and length >= plan.stream_from:
            streams = length * (2 * config.hidden_size * 4 + 20)
            arrays = length * stream_bytes_per_token(config) - streams
            # the head arrays are mapped apart from the heap and unmapped after the layers; the outputs' zeroed pages
            # become resident as the last stage writes them, after that
            live = max(arrays, outputs)
            working = 16 * tokens + streams + live + min(length, plan.piece) * STREAM_PIECE_BYTES_PER_POSITION[key]
            peak = max(peak, held + working)
            held += outputs
        else:
            chunk = (config.feed_forward_size + config.vocab_size + config.hidden_size) * itemsize
            working = (tokens * (16 + 4 * config.hidden_size * itemsize + plan.raw_width * itemsize
                                 + round(WHOLE_LAYER_COPIES[key] * layer_bytes_per_token(config, itemsize)))
                       + round(min(tokens, FEED_FORWARD_CHUNK) * chunk * WHOLE_CHUNK_COPIES[key]))
            peak = max(peak, held + working)
            held += outputs  # views of the batch's raw output, which then stays
    return Footprint(base, peak)


def longest_fitting(need: Callable[[int], int], budget: int, longest: int, boundaries: Sequence[int] = ()) -> int:
    """The longest length n in [1, longest] with need(n) <= budget (0: none), where ``need`` grows with n between
    ``boundaries`` (the streamed path starts cheaper than the whole one ends)."""
    best, low = 0, 1
    for high in [*sorted(b - 1 for b in boundaries if 1 < b <= longest), longest]:
        lo, hi = low, high
        while lo <= hi:
            mid = (lo + hi) // 2
            if need(mid) <= budget:
                best, lo = max(best, mid), mid + 1
            else:
                hi = mid - 1
        low = high + 1
    return best


# ------------------------------------------------------------------------------------------------- available
def parse_bytes(text: str, what: str = MEMORY_LIMIT_ENV) -> int:
    """'2GB', '1.5 GiB', '512M', '1000000' -> bytes (decimal units, or binary ones spelled KiB/MiB/GiB/TiB)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"{what}: got {text!r}; expected a positive size in bytes, e.g. 2000000000, 2GB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def memory_cap() -> int | None:
    """``$REFORMER_RT_MEMORY_LIMIT`` in bytes (None: unset)."""
    value = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    return parse_bytes(value) if value else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(stat: Path, key: str) -> int:
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith(key + " ")), 0)


def _cgroup_free() -> int | None:
    """The cgroup's limit minus its usage (reclaimable page cache counted free), None without a limit."""
    v2 = Path("/sys/fs/cgroup")
    limit, usage = _read_int(v2 / "memory.max"), _read_int(v2 / "memory.current")
    if limit is not None and usage is not None:
        return limit - usage + _inactive_file(v2 / "memory.stat", "inactive_file")
    v1 = v2 / "memory"
    limit, usage = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < 1 << 60:  # v1 reports "no limit" as a huge number
        return limit - usage + _inactive_file(v1 / "memory.stat", "total_inactive_file")
    return None


def _proc_bytes(path: str, field: str) -> int | None:
    """A "Field:   N kB" line of a /proc file, in bytes (None where the file or the line is not there)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(f"{field}:")), None)


def _mem_available() -> int | None:
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def resident_bytes() -> int | None:
    """This process's resident set now (``VmRSS``; None where /proc is not there). It is a Session's ``base``: the
    estimate ``BASE_BYTES`` is not what a given process holds -- the same ``import torch`` is 234 MB resident in one
    venv and 297 MB in a fresh copy of it on the same machine (how the kernel caches the freshly written libraries),
    and a process may hold other data besides."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def available(cap: int | None) -> tuple[int, str]:
    """(bytes this process may still take, where that figure comes from): the smallest of ``cap``, the cgroup's free
    memory and MemAvailable; a very large number where none is known (not Linux, no cap)."""
    figures = [(value, source) for value, source in ((cap, f"${MEMORY_LIMIT_ENV}"), (_cgroup_free(), "the cgroup's "
               "limit minus its usage"), (_mem_available(), "MemAvailable")) if value is not None]
    return min(figures) if figures else (1 << 62, "no limit known")


def size_text(n: int) -> str:
    """Bytes for a message: GB from a gigabyte, else MB."""
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.1f} MB"
