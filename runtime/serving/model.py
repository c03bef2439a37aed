"""A Session as a KServe v2 model: its inputs, outputs, metadata and Triton model config, and the translation of
one infer request into checked sequences and of their results into a response.

Inputs (Triton's batching convention: every tensor is ``[N, ...]`` for N sequences; ``max_batch_size`` is the most
sequences one request may carry):

* ``input_ids`` INT64 ``[N, L]`` -- with ``attention_mask`` INT64 ``[N, L]`` (ones first) for ragged rows; a
  rank-1 ``[L]`` is one sequence, and its outputs then have no batch dimension;
* or ``text`` BYTES ``[N]`` / ``[N, 1]``: UTF-8 strings, tokenized by the model's tokenizer (offered when it has
  one).

Outputs, chosen by name (``outputs.py`` defines them, per task: an LM's logits and scores, a classifier's logits and
probabilities, QA start/end logits, hidden states and embeddings; none named: the model's default outputs), batch
first and zero-padded across a ragged batch, plus ``lengths`` INT64 ``[N]`` (tokens per sequence). Request parameters:
``top_k``, ``pooling``, ``priority`` (lower is served first; 0 = the server's default level) and ``timeout``
(microseconds a request may wait in the queue), as tritonclient sends them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from reformer_rt.models import ReformerError

from ..outputs import OutputKind, OutputOptions, SequenceJob, pad_stack
from ..session import Session
from ..tokenizers import Tokenizer, load_tokenizer
from .protocol import BadRequest, InferRequest, InferResponse, datatype_of

VERSION = "1"
#: The most sequences one request may carry (Triton's ``max_batch_size`` in the model config).
MAX_SEQUENCES_PER_REQUEST = 256
LENGTHS_OUTPUT = "lengths"
GENERATED_IDS, GENERATED_TEXT = "generated_ids", "generated_text"  # see generating.py
_CONFIG_TYPES = {"INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """An infer request reduced to what the scheduler needs."""

    sequences: list[np.ndarray]
    kinds: list[OutputKind]
    with_lengths: bool
    options: OutputOptions
    batched: bool  # False: a rank-1 input_ids, outputs without the batch dimension
    priority: int  # 0: the host's default level
    timeout_us: int | None

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def jobs(self) -> list[SequenceJob]:
        """One ``SequenceJob`` per sequence, for ``Session.run_jobs`` / ``run_micro_batch``."""
        return [SequenceJob(seq, tuple(self.kinds), self.options) for seq in self.sequences]


class ServedModel:
    """One Session under a name; every method is cheap and thread-safe (the Session runs elsewhere)."""

    def __init__(self, name: str, session: Session, tokenizer_dir: Path | None = None) -> None:
        self.name, self.version, self.session = name, VERSION, session
        directory = tokenizer_dir or (session.path if session.path.is_dir() else None)
        try:
            self.tokenizer: Tokenizer | None = load_tokenizer(directory, session.config)
        except ReformerError:
            self.tokenizer = None  # no tokenizer found: no text input for this model; ids still work

    # ------------------------------------------------------------------------------------------- description
    @property
    def output_names(self) -> tuple[str, ...]:
        return (*self.session.outputs, LENGTHS_OUTPUT)

    def _input_specs(self) -> list[tuple[str, str, list[int], bool]]:
        """(name, datatype, per-sequence dims, optional)."""
        specs = [("input_ids", "INT64", [-1], self.tokenizer is not None), ("attention_mask", "INT64", [-1], True)]
        if self.tokenizer is not None:
            specs.append(("text", "BYTES", [1], True))
        return specs

    @property
    def can_generate(self) -> bool:
        """Whether the model answers with new tokens (``generating.py``): a causal LM whose session decodes (a
        checkpoint directory, on any backend: ``Session.can_decode``)."""
        session = self.session
        return session.can_decode and session.task == "lm" and session.config.is_decoder

    def _output_specs(self) -> list[tuple[str, str, list[int]]]:
        kinds = self.session.output_kinds(self.session.outputs)
        specs = [(k.name, "INT64" if k.dtype is np.int64 else "FP32", k.shape(self.session.config)) for k in kinds]
        if self.can_generate:
            specs.append((GENERATED_IDS, "INT64", [-1]))
            if self.tokenizer is not None:
                specs.append((GENERATED_TEXT, "BYTES", [1]))
        return [*specs, (LENGTHS_OUTPUT, "INT64", [1])]

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata: full shapes, -1 where a request decides."""
        return {
            "name": self.name, "versions": [self.version], "platform": f"reformer-rt_{self.session.backend}",
            "inputs": [{"name": n, "datatype": t, "shape": [-1, *dims]} for n, t, dims, _ in self._input_specs()],
            "outputs": [{"name": n, "datatype": t, "shape": [-1, *dims]} for n, t, dims in self._output_specs()],
        }

    def config(self) -> Any:
        """Triton's ``ModelConfig`` message for this model (per-sequence dims; the batch is ``max_batch_size``)."""
        from tritonclient.grpc import model_config_pb2 as pb

        config = pb.ModelConfig(name=self.name, backend="reformer-rt", max_batch_size=MAX_SEQUENCES_PER_REQUEST)
        for name, datatype, dims, optional in self._input_specs():
            config.input.add(name=name, data_type=pb.DataType.Value(_CONFIG_TYPES[datatype]), dims=dims,
                             optional=optional, allow_ragged_batch=name != "text")
        for name, datatype, dims in self._output_specs():
            config.output.add(name=name, data_type=pb.DataType.Value(_CONFIG_TYPES[datatype]), dims=dims)
        config.parameters["reformer_rt_backend"].string_value = self.session.backend
        config.parameters["max_length"].string_value = str(self.session.max_length)
        return config

    # ------------------------------------------------------------------------------------------------ requests
    def parse(self, request: InferRequest) -> ParsedRequest:
        """Checked sequences, outputs and options of ``request``; ``BadRequest``/``InputError`` otherwise."""
        sequences, batched = self.sequences_of(request)
        names = list(request.outputs) if request.outputs is not None else list(self.session.default_outputs)
        with_lengths = LENGTHS_OUTPUT in names
        names = [n for n in names if n != LENGTHS_OUTPUT]
        params = request.parameters
        options = self.session.output_options(_int_parameter(params, "top_k", OutputOptions.top_k, 1),
                                              params.get("pooling", OutputOptions.pooling))
        priority = _int_parameter(params, "priority", 0, 0)
        timeout = _int_parameter(params, "timeout", None, 0)
        kinds = self.session.output_kinds(names) if names else []
        return ParsedRequest(sequences, kinds, with_lengths, options, batched, priority, timeout)

    def sequences_of(self, request: InferRequest) -> tuple[list[np.ndarray], bool]:
        """The request's sequences, checked against the model, and whether they came with a batch dimension."""
        inputs = dict(request.inputs)
        unknown = sorted(set(inputs) - {name for name, *_ in self._input_specs()})
        if unknown:
            raise BadRequest(f"inputs {unknown}: not inputs of model {self.name!r}; expected input_ids (+ "
                             f"attention_mask){' or text' if self.tokenizer else ''}")
        mask = inputs.get("attention_mask")
        if "text" in inputs:
            if "input_ids" in inputs or mask is not None:
                raise BadRequest("inputs: give either text or input_ids (+ attention_mask), not both")
            sequences, batched = self._tokenize(inputs["text"]), True
        elif "input_ids" in inputs:
            sequences, batched = self._ids(inputs["input_ids"], mask)
        else:
            raise BadRequest(f"inputs: none given; expected input_ids{' or text' if self.tokenizer else ''}")
        if len(sequences) > MAX_SEQUENCES_PER_REQUEST:
            raise BadRequest(f"inputs: {len(sequences)} sequences; expected at most {MAX_SEQUENCES_PER_REQUEST} per "
                             "request (send several requests: the server batches them)")
        return self.session.check_sequences(sequences, mask), batched

    @staticmethod
    def _ids(ids: np.ndarray, mask: np.ndarray | None) -> tuple[Any, bool]:
        """``input_ids`` as the Session takes them (a list for rank 1, the array for rank 2), and whether batched;
        the Session checks the mask (shape, ones first)."""
        if ids.dtype != np.int64:
            raise BadRequest(f"input 'input_ids': datatype {datatype_of(ids)}; expected INT64")
        if ids.ndim == 1:
            if mask is not None:
                raise BadRequest("input 'attention_mask': only with a 2-D input_ids [N, L]; a 1-D input_ids is "
                                 "one sequence without padding")
            return [ids], False
        if ids.ndim != 2:
            raise BadRequest(f"input 'input_ids': shape {list(ids.shape)}; expected [L] or [N, L]")
        if mask is not None:
            if mask.dtype != np.int64:
                raise BadRequest(f"input 'attention_mask': datatype {datatype_of(mask)}; expected INT64")
            if ((mask != 0) & (mask != 1)).any():
                raise BadRequest("input 'attention_mask': values other than 0 and 1; expected 1 = token, "
                                 "0 = padding")
        return ids, True

    def _tokenize(self, texts: np.ndarray) -> list[np.ndarray]:
        assert self.tokenizer is not None
        sequences = []
        for i, item in enumerate(texts.reshape(-1)):
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"input 'text' element {i}: not UTF-8 ({exc})") from exc
            sequences.append(np.asarray(self.tokenizer.encode(text), dtype=np.int64))
        return sequences

    def respond(self, request: InferRequest, parsed: ParsedRequest, rows: dict[str, list[np.ndarray]]
                ) -> InferResponse:
        """The response of ``request``: each requested output, batch first unless the input was rank 1."""
        arrays = {kind.name: pad_stack(rows[kind.name]) if parsed.batched else rows[kind.name][0]
                  for kind in parsed.kinds}
        if parsed.with_lengths:
            lengths = np.array([len(s) for s in parsed.sequences], dtype=np.int64)
            arrays[LENGTHS_OUTPUT] = lengths if parsed.batched else lengths[:1]
        order = list(request.outputs) if request.outputs is not None else list(arrays)
        outputs = [(name, arrays[name], request.wants_binary(name)) for name in order]
        return InferResponse(self.name, self.version, request.id, outputs)


def _int_parameter(parameters: dict[str, Any], name: str, default: int | None, minimum: int) -> Any:
    value = parameters.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"parameter {name!r}: got {value!r}; expected an integer >= {minimum}")
    return value
