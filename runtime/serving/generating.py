"""Generation over the wire: a language model on the torch backend answers with new tokens, whole or streamed.

Three ways in, one decoding path (``Session.generate_stream``, cached, on the model's worker thread):

* v2 infer (HTTP or gRPC) asking for ``generated_ids`` (INT64 ``[N, T]``, -1 after a prompt's last token) and/or
  ``generated_text`` (BYTES ``[N]``, with a tokenizer), ``lengths`` optional: the whole continuation at once.
* Triton's generate extension over HTTP: ``POST /v2/models/NAME/generate`` (JSON in, JSON out) and
  ``.../generate_stream`` -- **server-sent events**, one ``data: {...}`` event per token, because that is what the
  extension specifies and what its clients (Triton's and OpenAI-style tools, curl, browsers' EventSource) read: one
  HTTP response whose events arrive as tokens are chosen, each a complete JSON object, no framing of our own.
  Request: ``text_input`` (string or list) or ``input_ids`` (list or list of lists), parameters at the top level or
  under ``parameters``.
* gRPC ``ModelStreamInfer`` with parameter ``stream: true``: one response per token (Triton's decoupled models do
  the same), each carrying ``generated_ids`` ``[1]`` and parameters ``prompt``, ``step``, ``finished``; a request
  that sets ``triton_enable_empty_final_response`` gets an empty last response flagged ``triton_final_response``.

Parameters (all optional): ``max_new_tokens`` (or ``max_tokens``; default 64), ``strategy`` (greedy | sample, or
``do_sample``), ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_ids`` (an id or a list). A client that goes
away stops its generation at the next token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

from ..generation import LENGTH, GenerationOptions, TokenEvent
from ..tokenizers import TextStream
from .model import GENERATED_IDS, GENERATED_TEXT, LENGTHS_OUTPUT, ServedModel
from .protocol import BadRequest, InferRequest, InferResponse

GENERATION_OUTPUTS = (GENERATED_IDS, GENERATED_TEXT)
DEFAULT_MAX_NEW_TOKENS = 64
PAD = -1  # generated_ids after a prompt's last token


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompts: list[np.ndarray]
    options: GenerationOptions
    outputs: tuple[str, ...]  # what to answer with (generated_ids, generated_text, lengths)
    batched: bool  # False: one prompt given without a batch dimension


def _check_can_generate(model: ServedModel) -> None:
    if not model.can_generate:
        why = (f"its backend is {model.session.backend}: cached decoding runs on the torch backend (serve the "
               "checkpoint directory with --backend torch)" if not model.session.can_decode else
               "it is not a causal language model")
        raise BadRequest(f"model {model.name!r} cannot generate: {why}")


def options_from(parameters: dict[str, Any]) -> GenerationOptions:
    """``GenerationOptions`` from request parameters (see the module docstring); errors name the parameter."""
    strategy = parameters.get("strategy")
    if strategy is None and "do_sample" in parameters:
        strategy = "sample" if parameters["do_sample"] is True else "greedy"
    stop = parameters.get("stop_ids", ())
    if isinstance(stop, str):  # gRPC parameters carry lists as JSON text
        try:
            stop = json.loads(stop)
        except json.JSONDecodeError:
            raise BadRequest(f"parameter 'stop_ids': got {stop!r}; expected an id or a list of ids") from None
    return GenerationOptions(
        parameters.get("max_new_tokens", parameters.get("max_tokens", DEFAULT_MAX_NEW_TOKENS)),
        strategy or "greedy", parameters.get("temperature", 1.0), parameters.get("top_k", 0),
        parameters.get("top_p", 1.0), parameters.get("seed", 0), (stop,) if isinstance(stop, int) else tuple(stop))


def parse_infer(model: ServedModel, request: InferRequest) -> GenerateRequest | None:
    """A v2 infer request that asks for generated outputs, checked; None when it asks for none."""
    wanted = tuple(request.outputs or ())
    if not any(name in GENERATION_OUTPUTS for name in wanted):
        return None
    _check_can_generate(model)
    others = [name for name in wanted if name not in (*GENERATION_OUTPUTS, LENGTHS_OUTPUT)]
    if others:
        raise BadRequest(f"outputs {others}: cannot be combined with {list(GENERATION_OUTPUTS)} in one request (a "
                         "generation runs its own decoding); ask for them in a separate request")
    if GENERATED_TEXT in wanted and model.tokenizer is None:
        raise BadRequest(f"output {GENERATED_TEXT!r}: model {model.name!r} has no tokenizer; ask for generated_ids")
    sequences, batched = model.sequences_of(request)
    return GenerateRequest(sequences, options_from(request.parameters), wanted, batched)


def parse_json(model: ServedModel, body: bytes) -> GenerateRequest:
    """A generate-extension request body (``text_input`` or ``input_ids`` plus parameters)."""
    _check_can_generate(model)
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BadRequest('request body: expected a JSON object such as {"text_input": "...", "max_tokens": 32}')
    parameters = dict(data.get("parameters") or {})
    parameters.update({k: v for k, v in data.items() if k not in ("text_input", "input_ids", "parameters", "id")})
    text, ids = data.get("text_input"), data.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("request body: give text_input (a string or a list of strings) or input_ids (a list of ids "
                         "or of id lists), one of them")
    if text is not None:
        if model.tokenizer is None:
            raise BadRequest(f"text_input: model {model.name!r} has no tokenizer; send input_ids")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("text_input: expected a string or a list of strings")
        prompts, batched = [model.tokenizer.encode(t) for t in texts], not isinstance(text, str)
    else:
        batched = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        prompts = ids if batched else [ids]
    sequences = model.session.check_sequences(prompts)
    return GenerateRequest(sequences, options_from(parameters), (GENERATED_IDS, GENERATED_TEXT), batched)


# ------------------------------------------------------------------------------------------------- running
#: How a host runs an iteration where the model's Session runs (a ``Runner``'s ``iterate``, ``service.py``).
Runner = Callable[[Callable[[], Iterator[Any]]], AsyncIterator[Any]]


def stream(model: ServedModel, request: GenerateRequest, run: Runner) -> AsyncIterator[TokenEvent]:
    return run(lambda: model.session.generate_stream(request.prompts, request.options))


async def collect(model: ServedModel, request: GenerateRequest, run: Runner) -> tuple[list[list[int]], list[str]]:
    """Every prompt's new tokens and finish reason."""
    tokens: list[list[int]] = [[] for _ in request.prompts]
    reasons = [LENGTH] * len(request.prompts)
    async for event in stream(model, request, run):
        tokens[event.prompt].append(event.token)
        if event.finished:
            reasons[event.prompt] = event.reason
    return tokens, reasons


# ------------------------------------------------------------------------------------------------ answers
class TextDelta:
    """Per prompt, the text of its tokens so far, handed out in pieces that never split a character (a
    ``TextStream`` per prompt; what is held back comes out with the prompt's last token)."""

    def __init__(self, model: ServedModel, prompts: int) -> None:
        tokenizer = model.tokenizer
        self.streams = None if tokenizer is None else [TextStream(tokenizer) for _ in range(prompts)]

    def add(self, event: TokenEvent) -> str:
        if self.streams is None:
            return ""
        stream = self.streams[event.prompt]
        piece = stream.push(event.token)
        return piece + stream.flush() if event.finished else piece


def infer_response(model: ServedModel, request: InferRequest, generate: GenerateRequest,
                   tokens: list[list[int]]) -> InferResponse:
    """The v2 answer: generated_ids (padded with -1), generated_text, lengths -- as the request asked."""
    longest = max(len(t) for t in tokens)
    ids = np.full((len(tokens), longest), PAD, dtype=np.int64)
    for row, new in enumerate(tokens):
        ids[row, :len(new)] = new
    arrays: dict[str, np.ndarray] = {GENERATED_IDS: ids, LENGTHS_OUTPUT: np.array([len(t) for t in tokens])}
    if model.tokenizer is not None:
        texts = np.empty(len(tokens), dtype=object)
        texts[:] = [model.tokenizer.decode(t).encode() for t in tokens]
        arrays[GENERATED_TEXT] = texts
    if not generate.batched:
        arrays = {name: array[0] if name != LENGTHS_OUTPUT else array[:1] for name, array in arrays.items()}
    outputs = [(name, arrays[name], request.wants_binary(name)) for name in generate.outputs]
    return InferResponse(model.name, model.version, request.id, outputs)


def json_answer(model: ServedModel, generate: GenerateRequest, tokens: list[list[int]],
                reasons: list[str]) -> dict[str, Any]:
    """The generate extension's answer (lists when the request was a list)."""
    texts = [model.tokenizer.decode(t) if model.tokenizer is not None else None for t in tokens]
    one = not generate.batched
    return {"model_name": model.name, "model_version": model.version,
            "text_output": texts[0] if one else texts, "output_ids": tokens[0] if one else tokens,
            "finish_reason": reasons[0] if one else reasons}


def sse_event(model: ServedModel, event: TokenEvent, piece: str) -> bytes:
    data = {"model_name": model.name, "model_version": model.version, "prompt": event.prompt, "step": event.step,
            "output_ids": [event.token], "text_output": piece, "finished": event.finished}
    if event.finished:
        data["finish_reason"] = event.reason
    return f"data: {json.dumps(data)}\n\n".encode()
