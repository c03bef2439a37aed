"""``Session``: one API over the TensorRT, ONNX Runtime and PyTorch backends, for ragged batches of long sequences.

    session = Session("model.onnx")                    # or a checkpoint directory, or a TensorRT engine
    out = session.run([[5, 7, 9], [4] * 70_000])       # out["logits"]: [N, L_max, V]; out["lengths"]: [N]
    out.plan.padding_waste                             # how the call was batched
    session.run(seqs, outputs=["last_logits", "embedding"], top_k=5)  # derived outputs (``outputs.py``)
    vectors = session.embed(sequences, pooling="mean") # [N, 2*hidden]
    session.score(text, window=4096, stride=2048).bits_per_character  # a corpus of any length (``scoring.py``)

Contract (the batching rules are in ``batching.py``): a call takes N sequences and returns exactly one result
per sequence, in order, padded with zeros to the longest; each sequence's result equals what the model gives
for that sequence alone, whatever shares its batch. A rejected call raises one ``ReformerError`` naming the
sequence and the problem, and leaves the Session usable.

Backend choice (``backend="auto"``): TensorRT when a GPU, the ``tensorrt`` package and the plugin are all
present; else PyTorch on CUDA (Triton kernels) for a checkpoint; else ONNX Runtime (a checkpoint is exported to
a portable ONNX file once, into the cache directory). The choice and the reason are logged and kept in
``session.backend`` / ``session.backend_reason``.

int8 on CPU (``quantize="int8"``, or a ``Quantization``): a checkpoint on the torch backend quantizes its Linear
layers (``backends.quantize_linear_layers``); on ONNX Runtime it is exported once with int8 weight products
(``cached_export``); an int8 ``.onnx`` file runs as it is, with or without the argument. ``session.quantization``
says what runs (None: float). Dynamic quantization scales each activation tensor by its own largest value, so a
batch-mate (and the padding it brings) would change a sequence's numbers: an int8 session runs one sequence per
forward pass, each at the length it runs at alone, and decodes one prompt at a time -- the contract above holds
exactly, at the price of batching, which buys no throughput on a CPU anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from reformer_rt.export.metadata import Quantization
from reformer_rt.models import InputError, InputTypeError, Reformer, ReformerConfig
from reformer_rt.models.heads import HIDDEN_STATE, LM_LOGITS, task_named
from reformer_rt.models.streamed import DEFAULT_PIECE

from . import generation, scoring
from .artifacts import artifact_kind, cached_export, cached_pieces
from .backends import Backend, OnnxRuntimeBackend, TorchBackend
from .batching import DEFAULT_MAX_TOKENS, BatchPlan, plan_batches, run_length
from .errors import BackendUnavailable
from .hardware import resolve_device
from .memory import (Footprint, PassPlan, available, footprint, longest_fitting, memory_cap, resident_bytes,
                     size_text)
from .outputs import (
    PER_POSITION, Alternative, OutputKind, OutputOptions, SequenceJob, available_outputs, output_kind, pad_stack,
)
from .streaming import OnnxPieces, Streamer, TorchArrays, stream_tokens, streams
from .tensorrt_backend import plugin_registered
from .tokenizers import Tokenizer

log = logging.getLogger("reformer_rt")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
#: Precisions of the torch backend (the weights and activations; softmax statistics stay fp32 in the kernels).
DTYPES = ("float32", "float16")


def tensorrt_ready() -> tuple[bool, str]:
    """Whether the TensorRT backend can run here, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return (True, "GPU + tensorrt + plugin") if plugin_registered() else (False, "tensorrt or its LSHAttention "
                                                                                "plugin is not usable")


@dataclasses.dataclass(frozen=True)
class RunResult(Mapping[str, np.ndarray]):
    """What ``Session.run`` returns: ``result[name]`` is an output padded with zeros to the longest sequence
    (``[N, L_max, X]`` for per-position outputs, ``[N, X]`` for per-sequence ones), ``result["lengths"]`` the
    lengths; ``rows[name][i]`` is sequence i's output unpadded; ``plan`` how the call was batched."""

    rows: dict[str, list[np.ndarray]]
    lengths: np.ndarray
    plan: BatchPlan
    #: Outputs written into the caller's arrays (``Session.run(..., out=...)``): given back as they are.
    out: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        if name == "lengths":
            return self.lengths
        if name in self.out:
            return self.out[name]
        return pad_stack(self.rows[name])

    def __iter__(self) -> Iterator[str]:
        return iter([*self.rows, "lengths"])

    def __len__(self) -> int:
        return len(self.rows) + 1


class Session:
    def __init__(self, path: str | Path, backend: str = "auto", device: str | None = None,
                 max_tokens_per_batch: int = DEFAULT_MAX_TOKENS, threads: int = 0, progress: bool = False,
                 dtype: str = "float32", quantize: str | Quantization | None = None) -> None:
        if backend not in BACKENDS:
            raise InputError(f"backend: got {backend!r}; expected one of {BACKENDS}")
        if dtype not in DTYPES:
            raise InputError(f"dtype: got {dtype!r}; expected one of {DTYPES}")
        if isinstance(max_tokens_per_batch, bool) or not isinstance(max_tokens_per_batch, int) \
                or max_tokens_per_batch < 1:
            raise InputError(f"max_tokens_per_batch: got {max_tokens_per_batch!r}; expected an integer >= 1")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InputError(f"threads: got {threads!r}; expected an integer >= 0 (0 = all cores)")
        if not isinstance(path, (str, os.PathLike)):
            raise InputTypeError(f"path: got {type(path).__name__}; expected a checkpoint directory, an .onnx file "
                                 "or an engine file name")
        self.path = Path(path)
        kind = artifact_kind(self.path)
        self.device = resolve_device(device)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.progress = progress
        name, self.backend_reason = self._choose(backend, kind)
        if dtype != "float32" and name != "torch":
            raise InputError(f"dtype {dtype}: the {name} backend runs the precision its file was exported with; "
                             "export with --dtype float16 (then build), or open the checkpoint with backend='torch'")
        quantization = Quantization.of(quantize)
        if quantization is not None and (name == "tensorrt" or dtype != "float32"):
            raise InputError(f"quantize {quantization.scheme}: got backend {name}, dtype {dtype}; int8 runs on the "
                             "torch and onnxruntime backends (CPU) from float32 weights")
        self.dtype = dtype
        self._quantize = quantization
        #: ``$REFORMER_RT_MEMORY_LIMIT`` as this session read it when it opened (``memory.py``).
        self.memory_cap: int | None = memory_cap()
        self._kind, self._threads = kind, threads
        self._backend: Backend = self._open(name, kind, threads)
        #: the process's resident bytes with this session open: the memory model's ``base`` (``memory.py``)
        self._base_bytes = resident_bytes()
        self._companion_backend: Backend | None = None  # see ``_companion``
        self._companion_lock = threading.Lock()
        self._streamer_made: list[Streamer | None] = []  # see ``_streamer``
        self._streamer_lock = threading.Lock()
        self.backend: str = self._backend.name
        self.config: ReformerConfig = self._backend.config
        self.task: str = self._backend.task
        task = task_named(self.task)
        #: What ``run`` gives when no outputs are named: an LM's logits, a classifier's logits, QA start and end...
        self.default_outputs: tuple[str, ...] = task.default_outputs
        self._per_position = {**{raw.name: raw.per_position for raw in task.raw_outputs}, **PER_POSITION}
        #: Raw outputs only the checkpoint's PyTorch model gives here (``_companion``): none for a torch session or
        #: an exported file.
        self._companion_outputs: tuple[str, ...] = tuple(
            raw.name for raw in task.raw_outputs if raw.name not in self._backend.outputs) \
            if kind == "checkpoint" and self._backend.decoder is None else ()
        self.output_name: str = self.default_outputs[0]
        self.max_length: int = self._backend.max_length
        #: How the weight products that run are quantized (None: float).
        self.quantization: Quantization | None = self._backend.quantization
        log.info("reformer-rt: backend %s for %s (%s)%s", self.backend, self.path, self.backend_reason,
                 "" if self.quantization is None else f", {self.quantization.describe()}")

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output name ``run`` accepts for this model in this session."""
        return available_outputs((*self._backend.outputs, *self._companion_outputs))

    @property
    def can_decode(self) -> bool:
        """Whether ``generate`` runs here (the model must also be a causal LM): the backend decodes with a cache, or
        the session opened a checkpoint directory, whose PyTorch model decodes beside the backend (``_companion``)."""
        return self._backend.decoder is not None or self._kind == "checkpoint"

    def _companion(self) -> Backend:
        """The backend that decodes and gives the outputs the session's own backend lacks: the backend itself when it
        can (torch), else the checkpoint's PyTorch model on this device and dtype, opened on first use -- an exported
        graph has no decoding step and holds only the outputs it was exported with, while the checkpoint has both.
        Its weights and activations add to the session's memory from then on."""
        if self._backend.decoder is not None:
            return self._backend
        if self._kind != "checkpoint":
            raise BackendUnavailable(f"generate: cached decoding runs on the torch backend; this session runs the "
                                     f"{self._kind} file {self.path} on {self.backend}, which has no decoding step -- "
                                     "open the checkpoint directory instead (any backend: the PyTorch model then "
                                     "decodes beside it)")
        with self._companion_lock:
            if self._companion_backend is None:
                log.info("reformer-rt: opening the PyTorch model of %s beside %s (generation, %s)", self.path,
                         self.backend, ", ".join(self._companion_outputs) or "no other outputs")
                if self._threads:
                    torch.set_num_threads(self._threads)
                self._companion_backend = TorchBackend(_load_model(self.path), self.device, self.dtype,
                                                       self._quantize)
            return self._companion_backend

    def _streamer(self) -> Streamer | None:
        """How this session runs rows streamed (``streaming.py``), made on first use: the torch backend's model as
        ``TorchPieces``; ONNX Runtime (opened on a checkpoint) as the piece graphs, exported once per config, fed
        the checkpoint's weights; None where rows run whole: an exported file or engine (whose graph is all there
        is), TensorRT, a GPU, float16, int8 (the pieces run float weights), or a task other than a language model or
        a bare model."""
        with self._streamer_lock:
            if not self._streamer_made:
                self._streamer_made.append(self._make_streamer())
            return self._streamer_made[0]

    @property
    def streamable(self) -> bool:
        """Whether long rows run streamed on this session (``_streamer``), without making the streamer."""
        return (self._kind == "checkpoint" and self.device == "cpu" and self.dtype == "float32"
                and self.quantization is None and self.task in ("lm", "base")
                and self.backend in ("torch", "onnxruntime"))

    def _make_streamer(self) -> Streamer | None:
        if not self.streamable:
            return None
        if isinstance(self._backend, TorchBackend):
            return Streamer(TorchArrays(self._backend.model), self.config, self.task)
        companion = self._companion_backend
        model = companion.model if isinstance(companion, TorchBackend) else _load_model(self.path)  # feeds the graphs
        return Streamer(OnnxPieces(cached_pieces(model), model, self._threads), self.config, self.task)

    # ------------------------------------------------------------------------------------------ backend choice
    def _choose(self, backend: str, kind: str) -> tuple[str, str]:
        if backend != "auto":
            return backend, "requested"
        if kind == "engine":
            return "tensorrt", "the model is a TensorRT engine"
        ready, why = tensorrt_ready()
        if ready:
            return "tensorrt", why
        if kind == "checkpoint" and self.device.startswith("cuda"):
            return "torch", f"TensorRT unavailable ({why}); PyTorch on CUDA runs the Triton kernels"
        return "onnxruntime", f"TensorRT unavailable ({why}); {'no CUDA' if self.device == 'cpu' else 'ONNX file'}"

    def _open(self, name: str, kind: str, threads: int) -> Backend:
        if name == "torch":
            if kind != "checkpoint":
                raise BackendUnavailable(f"backend torch: needs a checkpoint directory; got a {kind} file "
                                         f"{self.path} (use backend='onnxruntime' or 'tensorrt')")
            if threads:
                torch.set_num_threads(threads)
            return TorchBackend(_load_model(self.path), self.device, self.dtype, self._quantize)
        if name == "onnxruntime":
            if kind == "engine":
                raise BackendUnavailable(f"backend onnxruntime: {self.path} is a TensorRT engine")
            onnx_path = self.path if kind == "onnx" else cached_export(self.path, verbose=self.progress,
                                                                        quantization=self._quantize)
            opened = OnnxRuntimeBackend(onnx_path, self.device, threads)
            if self._quantize is not None and not self._quantize.same_choice(opened.quantization):
                has = "float" if opened.quantization is None else opened.quantization.describe()
                raise InputError(f"quantize: asked for {self._quantize.describe()}; {self.path} is {has} -- export "
                                 "it again with reformer-rt export --quantize, or open it without quantize (an "
                                 "export runs in the precision it was written with)")
            return opened
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend.open(self.path, kind, self.device)

    # ---------------------------------------------------------------------------------------------- inference
    def run(self, sequences: Any, attention_mask: Any = None, outputs: str | Sequence[str] | None = None,
            top_k: int = OutputOptions.top_k, pooling: str = OutputOptions.pooling,
            out: Mapping[str, np.ndarray] | None = None) -> RunResult:
        """Outputs for N sequences (default: the model's own, ``logits`` or ``last_hidden_state``); each
        sequence's result equals that sequence run alone. See ``outputs.py`` for every output and option.

        ``out`` maps per-position outputs (``logits``, ``last_hidden_state``) to arrays of their padded shape
        [N, L_max, X] float32 -- a ``numpy.lib.format.open_memmap`` file, say -- that receive them instead of
        memory of their own: streamed rows (``streaming.py``) write them piece by piece, so a 1,048,576-token
        sequence's logits never exist in memory at once. Positions past a sequence's end are set to 0."""
        names = list(self.default_outputs) if outputs is None else [outputs] if isinstance(outputs, str) \
            else list(outputs)
        kinds = tuple(self.output_kinds(names))
        options = self.output_options(top_k, pooling)
        seqs = self.check_sequences(sequences, attention_mask)
        destinations = _check_out(out, kinds, seqs, self.config)
        budget, source = available(self.memory_cap)
        refusal = self.memory_refusal([len(s) for s in seqs], kinds, [k.name for k in kinds if k.name not in
                                                                      destinations], budget, source)
        if refusal is not None:
            raise InputError(refusal)
        jobs = [SequenceJob(seq, kinds, options, {name: array[i, :len(seq)] for name, array in destinations.items()})
                for i, seq in enumerate(seqs)]
        for name, array in destinations.items():
            for i, seq in enumerate(seqs):
                if len(seq) < array.shape[1]:
                    array[i, len(seq):] = 0
        results, plan = self.run_jobs(jobs)
        rows = {kind.name: [result[kind.name] for result in results] for kind in kinds}
        return RunResult(rows, np.array([len(s) for s in seqs], dtype=np.int64), plan, dict(destinations))

    def run_jobs(self, jobs: Sequence[SequenceJob]) -> tuple[list[dict[str, np.ndarray]], BatchPlan]:
        """Checked sequences that may want different outputs (several callers' requests): planned together by the
        batching contract, one result per job, in order, each equal to that sequence run alone."""
        plan = plan_batches(self.config, [len(job.sequence) for job in jobs], self.max_tokens_per_batch)
        results: list[dict[str, np.ndarray]] = [{} for _ in jobs]
        bar = tqdm(plan.batches, desc="micro-batches", unit="batch", disable=not self.progress or len(plan.batches) < 2)
        for batch in bar:
            outs = self.run_micro_batch([jobs[i] for i in batch.indices], batch.length)
            for index, out in zip(batch.indices, outs):
                results[index] = out
        return results, plan

    def run_micro_batch(self, jobs: Sequence[SequenceJob], length: int) -> list[dict[str, np.ndarray]]:
        """ONE forward pass over jobs that share a micro-batch (``batching.py`` decides which, and ``length``), then
        each job's own outputs, each from the cheapest raw output this batch's path gives (``OutputKind.route``)."""
        streamer = self._streamer() if streams(self.config, length) else None
        routes = {kind.name: self._route(kind, streamer) for job in jobs for kind in job.kinds}
        sources = tuple(dict.fromkeys(route.source for route in routes.values())) or self._backend.outputs[:1]
        # a pass-through output with a destination is written there by the forward pass itself
        out = {routes[name].source: [job.out[name] for job in jobs] for name in jobs[0].out} or None
        raw = self.run_batch([job.sequence for job in jobs], length, sources, out, streamer)
        return [{kind.name: routes[kind.name].reduce(raw[routes[kind.name].source][row], job.sequence, job.options)
                 for kind in job.kinds} for row, job in enumerate(jobs)]

    def _route(self, kind: OutputKind, streamer: Streamer | None) -> Alternative:
        """Where ``kind`` comes from in a batch: the streamed run's outputs, else the backend's own, else (outputs an
        exported graph lacks) the checkpoint's PyTorch model beside it."""
        if streamer is not None:
            route = kind.route(streamer.outputs)
        else:
            route = kind.route(self._backend.outputs) or kind.route((*self._backend.outputs, *self._companion_outputs))
        assert route is not None, f"output {kind.name} was accepted but cannot be computed"
        return route

    # ------------------------------------------------------------------------------------------------- memory
    def memory_footprint(self, lengths: Sequence[int], kinds: Sequence[OutputKind],
                         in_memory: Sequence[str]) -> Footprint:
        """The predicted peak of one call on sequences of these ``lengths`` giving ``kinds`` (``memory.py``), of
        which ``in_memory`` come back in memory (the others go into the caller's arrays)."""
        return footprint(self._memory_plan(lengths, kinds, in_memory))

    def _memory_plan(self, lengths: Sequence[int], kinds: Sequence[OutputKind], in_memory: Sequence[str]) -> PassPlan:
        plan = plan_batches(self.config, list(lengths), self.max_tokens_per_batch)
        batches = [(1 if self.quantization is not None else len(b.indices), b.length)  # int8: a row per pass
                   for b in plan.batches for _ in range(len(b.indices) if self.quantization is not None else 1)]
        sources = {self._route(kind, None).source for kind in kinds}
        widths = {LM_LOGITS.name: self.config.vocab_size, HIDDEN_STATE.name: 2 * self.config.hidden_size}
        raw_width = sum(widths.get(name, 1) for name in sources if self._per_position.get(name, False))
        held_width = sum(int(np.prod([size for size in kind.shape(self.config)[1:] if size > 0]))
                         for kind in kinds if kind.name in in_memory and kind.dims[:1] in (("n",), ("n-1",)))
        return PassPlan(self.config, self.backend, self.dtype, stream_tokens() if self.streamable else None,
                        DEFAULT_PIECE, batches, raw_width, held_width, self._base_bytes)

    def memory_refusal(self, lengths: Sequence[int], kinds: Sequence[OutputKind], in_memory: Sequence[str],
                       budget: int, source: str) -> str | None:
        """Why a call would not fit ``budget`` bytes beyond what the process holds (None: it fits): the predicted
        need, the longest single sequence that fits with these outputs, and what lowers the need."""
        need = self.memory_footprint(lengths, kinds, in_memory)
        if need.working <= budget:
            return None
        longest = longest_fitting(lambda n: self.memory_footprint([n], kinds, in_memory).working, budget,
                                  self.max_sequence_length, [stream_tokens()] if self.streamable else [])
        ways = []
        held = [name for name in in_memory if name in ("logits", "last_hidden_state")]
        if held and footprint(dataclasses.replace(self._memory_plan(lengths, kinds, in_memory),
                                                  held_width=0)).working < need.working:
            ways.append(f"write {' and '.join(held)} into a memory map instead of memory (Session.run(out={{{held[0]!r}:"
                        " numpy.lib.format.open_memmap(...)}), reformer-rt run -o FILE.npy)")
        ways.append("ask only reduced outputs (log_probs, last_logits, top_k_ids, embedding)")
        if len(lengths) > 1:
            ways.append(f"fewer sequences per call or a smaller max_tokens_per_batch (now {self.max_tokens_per_batch:,})")
        other = "torch" if self.backend == "onnxruntime" else "onnxruntime"
        if self.backend in ("torch", "onnxruntime") and self._kind == "checkpoint":
            theirs = footprint(dataclasses.replace(self._memory_plan(lengths, kinds, in_memory), backend=other))
            if theirs.working < need.working:
                ways.append(f"backend {other!r} (predicted {size_text(theirs.working)})")
        fits = f"at most {longest:,} tokens in one sequence" if longest else "no sequence at all"
        return (f"memory: this call needs about {size_text(need.working)} beyond what the process holds (predicted "
                f"peak {size_text(need.peak)}, {len(lengths)} sequence(s), longest {max(lengths):,} tokens, outputs "
                f"{[kind.name for kind in kinds]}); {size_text(budget)} are available ({source}); expected {fits} "
                f"with these outputs on this session -- to need less: {'; '.join(ways)}")

    def output_options(self, top_k: int = OutputOptions.top_k, pooling: str = OutputOptions.pooling) -> OutputOptions:
        """A caller's options, with the model's own (``problem_type``)."""
        return OutputOptions(top_k, pooling, self.config.problem_type)

    def output_kinds(self, names: Sequence[str]) -> list[OutputKind]:
        """The output kinds called ``names`` (distinct, at least one), or an error listing what this model gives."""
        if not names or len(set(names)) != len(names):
            raise InputError(f"outputs: got {list(names)}; expected distinct names from {list(self.outputs)}")
        raw = (*self._backend.outputs, *self._companion_outputs)
        return [output_kind(name, raw) for name in names]

    def run_batch(self, seqs: list[np.ndarray], length: int, sources: tuple[str, ...],
                  out: dict[str, list[np.ndarray]] | None = None,
                  streamer: Streamer | None = None) -> dict[str, list[np.ndarray]]:
        """ONE forward pass over checked sequences that share a micro-batch (``batching.py`` decides which and
        ``length``): each raw output in ``sources``, one array per sequence (per-position ones cut to its length).
        ``out``: destinations of per-position raw outputs, one [n_i, X] array per sequence, filled and given back;
        ``streamer``: run the batch streamed (``streaming.py``) instead of on the backend's whole-sequence path. An
        int8 session runs each sequence alone instead (module docstring)."""
        if self.quantization is not None and len(seqs) > 1:
            parts = [self.run_batch([seq], run_length(self.config, [len(seq)]), sources,
                                    {name: [rows[row]] for name, rows in (out or {}).items()}, streamer)
                     for row, seq in enumerate(seqs)]
            return {name: [part[name][0] for part in parts] for name in sources}
        ids = np.zeros((len(seqs), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        if streamer is not None:
            raw = streamer.run(ids, mask, sources, out)
        else:
            own = tuple(name for name in sources if name in self._backend.outputs)
            raw = self._backend.run(ids, mask, own) if own else {}
            if len(own) < len(sources):  # outputs only the checkpoint's PyTorch model gives (``_companion``)
                raw.update(self._companion().run(ids, mask, tuple(n for n in sources if n not in own)))
        rows = {name: [_row_of(raw[name], row, len(seq), self._per_position[name]) for row, seq in enumerate(seqs)]
                for name in sources}
        for name, destinations in (out or {}).items():
            for row, destination in enumerate(destinations):
                if rows[name][row] is not destination:
                    destination[...] = rows[name][row]
                    rows[name][row] = destination
        return rows

    def embed(self, sequences: Any, pooling: str = "mean", attention_mask: Any = None) -> np.ndarray:
        """One vector per sequence [N, 2*hidden]: mean over its tokens, or its last token's hidden state."""
        return self.run(sequences, attention_mask, outputs=["embedding"], pooling=pooling)["embedding"]

    def score(self, source: str | Sequence[int] | np.ndarray, window: int | None = None, stride: int | None = None,
              tokenizer: Tokenizer | None = None) -> scoring.ScoreResult:
        """Mean negative log-likelihood of one text (tokenized by ``tokenizer``, default the model's) or sequence of
        ids of any length, by the standard strided evaluation: windows of ``window`` tokens (default the maximum
        length) every ``stride`` (default ``window``), each scoring what the previous one did not (``scoring.py``)."""
        return scoring.score(self, source, window, stride, tokenizer)

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence ``run`` accepts: within what the backend takes (an export's ``max_length``), and
        short enough that padding to the chunk multiple stays within ``max_position_embeddings``."""
        return min(self.max_length, self.config.max_input_length)

    def check_sequences(self, sequences: Any, attention_mask: Any = None) -> list[np.ndarray]:
        """The sequences as int64 arrays, each checked against the model (non-empty, within the maximum length,
        ids in the vocabulary); an ``InputError`` names the first bad one."""
        seqs = _as_sequences(sequences, attention_mask)
        vocab, limit = self.config.vocab_size, self.max_sequence_length
        for i, seq in enumerate(seqs):
            if len(seq) == 0:
                raise InputError(f"sequence {i}: empty; expected at least one token")
            if len(seq) > limit:
                why = "the model's maximum length" if limit == self.max_length else (
                    f"longer inputs pad to a multiple of {self.config.chunk_multiple}, past max_position_embeddings="
                    f"{self.config.max_position_embeddings}")
                raise InputError(f"sequence {i}: {len(seq):,} tokens; expected at most {limit:,} ({why}) -- split "
                                 "it; nothing is truncated silently")
            low, high = int(seq.min()), int(seq.max())
            if low < 0 or high >= vocab:
                raise InputError(f"sequence {i}: token id {low if low < 0 else high}; expected ids in "
                                 f"[0, {vocab - 1}]")
        return seqs

    def generate(self, prompts: Any, options: generation.GenerationOptions) -> generation.GenerationResult:
        """New tokens for each prompt by cached decoding, batched (``generation.py``), on the backend when it decodes,
        else on the checkpoint's PyTorch model beside it (``_companion``)."""
        checked = self._prompts(prompts, options)
        return generation.generate(self._companion(), checked, options, self._generation_budget)

    def generate_stream(self, prompts: Any, options: generation.GenerationOptions) -> Iterator[generation.TokenEvent]:
        """``generate`` as ``TokenEvent``s, each as soon as its token is chosen; everything is checked at the call."""
        checked = self._prompts(prompts, options)
        return generation.generate_stream(self._companion(), checked, options, self._generation_budget)

    @property
    def _generation_budget(self) -> int:
        """Tokens per decoding batch: 1 puts every prompt of an int8 session in a batch of its own (module
        docstring)."""
        return 1 if self.quantization is not None else self.max_tokens_per_batch

    def _prompts(self, prompts: Any, options: object) -> list[np.ndarray]:
        """The prompts of a generation, checked once for either way of generating, once ``options`` is one object."""
        if not isinstance(options, generation.GenerationOptions):
            raise InputTypeError(f"options: got {type(options).__name__}; expected a GenerationOptions "
                                 "(reformer_rt.runtime.generation), e.g. GenerationOptions(max_new_tokens=64, "
                                 "strategy='sample', seed=1)")
        return self.check_sequences(prompts)


def _row_of(value: np.ndarray | list[np.ndarray], row: int, length: int, per_position: bool) -> np.ndarray:
    """One sequence's part of a raw output: a batch array's row (per-position ones cut to ``length``), or the
    sequence's own destination array."""
    if isinstance(value, list):
        return value[row]
    return value[row, :length] if per_position else value[row]


def _check_out(out: Mapping[str, np.ndarray] | None, kinds: Sequence[OutputKind], seqs: list[np.ndarray],
               config: ReformerConfig) -> dict[str, np.ndarray]:
    """``Session.run``'s ``out``: per-position outputs that are asked for, each an array of their padded shape."""
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise InputTypeError(f"out: got {type(out).__name__}; expected a dict of output name -> array")
    takes = {kind.name: kind for kind in kinds if kind.dims[:1] == ("n",) and kind.passed_through}
    checked = {}
    for name, array in out.items():
        if name not in takes:
            raise InputError(f"out: got {name!r}; expected outputs asked for that hold a row per position "
                             f"({sorted(takes) or 'none asked'}); the others are small -- take them from the result")
        width = takes[name].shape(config)[-1]
        shape = (len(seqs), max(len(s) for s in seqs), width)
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != np.float32:
            got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
            raise InputError(f"out[{name!r}]: got {got}; expected a float32 array of shape {shape} (e.g. "
                             "numpy.lib.format.open_memmap(path, mode='w+', dtype='float32', shape=...))")
        if not array.flags.writeable:
            raise InputError(f"out[{name!r}]: the array is read-only; expected a writable one")
        checked[name] = array
    return checked


def _as_sequences(sequences: Any, attention_mask: Any) -> list[np.ndarray]:
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.cpu().numpy()
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 2:
            raise InputError(f"sequences: got an array of shape {sequences.shape}; expected [N, L] or a list "
                             "of token-id lists")
        if sequences.shape[0] == 0:
            raise InputError(f"sequences: got an array of shape {sequences.shape}; expected at least one sequence")
        rows = [_as_ids(row, i) for i, row in enumerate(sequences)]
        if attention_mask is None:
            return rows
        mask = _as_mask(attention_mask, sequences.shape)
        lengths = mask.sum(axis=1)
        for i, (row, n) in enumerate(zip(mask, lengths)):
            if not row[:n].all():
                raise InputError(f"attention_mask row {i}: ones must come first (right padding); got a gap")
        return [row[:n] for row, n in zip(rows, lengths)]
    if attention_mask is not None:
        raise InputError("attention_mask: only valid with a 2-D array of sequences; a list is already ragged")
    if not isinstance(sequences, Sequence) or isinstance(sequences, (str, bytes)):
        raise InputTypeError(f"sequences: got {type(sequences).__name__}; expected a list of token-id lists "
                             "or a 2-D int array")
    if len(sequences) == 0:
        raise InputError("sequences: got an empty batch; expected at least one sequence")
    return [_as_ids(seq, i) for i, seq in enumerate(sequences)]


def _as_mask(attention_mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The mask as bool [N, L]: bool, or numbers that are all 0 (padding) or 1 (token)."""
    try:
        mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(f"attention_mask: cannot read it as an array ({exc}); expected a [N, L] array of 0/1") from exc
    if mask.shape != shape:
        raise InputError(f"attention_mask: got shape {mask.shape}; expected {shape}")
    if mask.dtype != np.bool_ and not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise InputTypeError(f"attention_mask: got dtype {mask.dtype}; expected bool or numbers: 1 = token, "
                             "0 = padding")
    if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
        bad = mask[~np.isin(mask, (0, 1))].flat[0]
        raise InputError(f"attention_mask: got values other than 0 and 1 ({bad}); expected 1 = token, 0 = padding")
    return mask.astype(bool)


def _as_ids(seq: Any, index: int) -> np.ndarray:
    if isinstance(seq, Sequence) and any(isinstance(x, (bool, np.bool_)) for x in seq):
        raise InputTypeError(f"sequence {index}: got a boolean (true/false) among the ids; expected integer token ids")
    try:
        array = np.asarray(seq)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nesting such as [1, [2, 3]]
        raise InputError(f"sequence {index}: cannot read it as a flat list of token ids ({exc})") from exc
    if array.ndim != 1:
        raise InputError(f"sequence {index}: got shape {array.shape}; expected a flat list of token ids")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)  # refused as empty by check_sequences, whatever its dtype
    if not np.issubdtype(array.dtype, np.integer):
        if isinstance(seq, Sequence) and all(isinstance(x, int) for x in seq):  # numpy fell back to float / object
            raise InputError(f"sequence {index}: token id {max(seq, key=abs)} does not fit int64; expected ids in "
                             "the model's vocabulary")
        raise InputTypeError(f"sequence {index}: got dtype {array.dtype}; expected integer token ids")
    if array.dtype == np.uint64 and int(array.max()) > np.iinfo(np.int64).max:
        raise InputError(f"sequence {index}: token id {int(array.max())}; expected ids that fit int64")
    return array.astype(np.int64)


def _load_model(path: Path) -> Reformer:
    from reformer_rt.export import load_source

    return load_source(path)

