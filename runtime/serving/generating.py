"""Generation over the wire: a causal language model answers with new tokens, whole or streamed.

Three ways in, one decoding path (``Session.generate_stream``, cached, where the model's Session runs):

* v2 infer (HTTP or gRPC) asking for ``generated_ids`` (INT64 ``[N, T]``, -1 after a prompt's last token) and/or
  ``generated_text`` (BYTES ``[N]``, with a tokenizer), ``lengths`` optional: the whole continuation at once.
* The Open Inference Protocol's generate extension over HTTP: ``POST /v2/models/NAME/generate`` (JSON in, JSON out)
  and ``.../generate_stream`` -- **server-sent events**, one ``data: {...}`` event per token, because that is what
  the extension specifies and what its clients (Triton's and OpenAI-style tools, curl, browsers' EventSource) read.
  Request: ``text_input`` (a string; a list of strings is our batched form) or ``input_ids`` (a list of ids or of
  id lists), parameters under ``parameters`` or at the top level. Answer (``GenerateResponse``): ``text_output``,
  ``model_name``, ``model_version``, plus ``output_ids`` and ``finish_reason``; with ``details: true`` also
  ``details`` = {``finish_reason``, ``logprobs``: one ``Token`` per new token}. Stream events
  (``GenerateStreamResponse``): ``text_output`` (the new text), ``model_name``, ``model_version``, ``output_ids``,
  ``prompt``, ``step``, ``finished``; the last event of a prompt carries ``details`` = {``finish_reason``,
  ``token``} (and ``finish_reason``).
* gRPC ``ModelStreamInfer`` with parameter ``stream: true``: one response per token (Triton's decoupled models do
  the same), each carrying ``generated_ids`` ``[1]`` and parameters ``prompt``, ``step``, ``finished`` (and
  ``finish_reason`` on the last); a request that sets ``triton_enable_empty_final_response`` gets an empty last
  response flagged ``triton_final_response``.

Parameters (all optional; ``GENERATE_PARAMETERS``): ``max_tokens`` (or ``max_new_tokens``; default
``min(64, the server's cap, what the model's positions leave)``), ``temperature`` (0 = greedy), ``top_k``,
``top_p``, ``seed``, ``strategy`` (greedy | sample, or ``do_sample``), ``stop`` (strings: the prompt ends once its
text contains one), ``stop_ids`` (an id or a list: the prompt ends on that token), ``details``, ``timeout``
(microseconds: the prompt ends at the first token after it). Limits: a budget over the server's
``--max-new-tokens`` or over the positions the prompt leaves is a 400 naming both numbers. A wrong JSON type
anywhere is a 400 naming the parameter. Finish reasons, the extension's: ``length``, ``eos_token`` (a
``stop_ids`` token), ``stop_sequence``; and ``timeout``, ours, when the request's timeout ended it. A client that
goes away stops its generation at the next token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

from ..generation import LENGTH, STOP, STRATEGIES, GenerationOptions, TokenEvent
from ..tokenizers import TextStream
from .model import GENERATED_IDS, GENERATED_TEXT, LENGTHS_OUTPUT, ServedModel
from .protocol import BadRequest, InferRequest, InferResponse

GENERATION_OUTPUTS = (GENERATED_IDS, GENERATED_TEXT)
#: New tokens of a request that names no budget (at most the server's cap and the positions the prompt leaves).
DEFAULT_MAX_NEW_TOKENS = 64
#: The server-wide cap on one request's new tokens (``reformer-rt serve --max-new-tokens``).
DEFAULT_MAX_NEW_TOKENS_CAP = 1024
PAD = -1  # generated_ids after a prompt's last token
#: Why a prompt ended, as the generate extension names it (``timeout``: ours).
EOS_TOKEN, STOP_SEQUENCE, TIMEOUT = "eos_token", "stop_sequence", "timeout"
WIRE_REASONS = {STOP: EOS_TOKEN, LENGTH: LENGTH}


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompts: list[np.ndarray]
    options: GenerationOptions
    outputs: tuple[str, ...]  # what to answer with (generated_ids, generated_text, lengths)
    batched: bool  # False: one prompt given without a batch dimension
    stop_sequences: tuple[str, ...] = ()
    details: bool = False
    timeout_us: int | None = None


@dataclasses.dataclass(frozen=True)
class Generated:
    """One new token as the wire sees it: ``event`` (its finish reason in the extension's words) and the text it
    completes (``piece``; empty while a character is still missing bytes)."""

    event: TokenEvent
    piece: str


def _check_can_generate(model: ServedModel) -> None:
    if not model.can_generate:
        why = (f"it is an exported {model.session.backend} file, which has no decoding step (serve the checkpoint "
               "directory: its PyTorch model decodes beside any backend)" if not model.session.can_decode else
               "it is not a causal language model")
        raise BadRequest(f"model {model.name!r} cannot generate: {why}")


# --------------------------------------------------------------------------------------------------- parameters
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


#: parameter -> (JSON type check, what is expected, in words). Unknown parameters are ignored (the extension lets
#: clients add their own); every known one is checked for its type before anything runs.
GENERATE_PARAMETERS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = no limit)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "strategy": (lambda v: v in STRATEGIES, f"one of {list(STRATEGIES)}"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "stop": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "stop_ids": (lambda v: _is_int(v) and v >= 0 or isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v),
                 "a token id or a list of token ids"),
    "details": (lambda v: isinstance(v, bool), "true or false"),
    "timeout": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (microseconds)"),
}


@dataclasses.dataclass(frozen=True)
class GenerationLimits:
    """A host's limits on generation: the most new tokens one request may ask for, and the default."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS_CAP
    default_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


def _checked(parameters: dict[str, Any]) -> dict[str, Any]:
    """The known parameters, each of its type (gRPC carries lists as JSON text); an error names the first bad one."""
    out = {}
    for name, (valid, expected) in GENERATE_PARAMETERS.items():
        if name not in parameters:
            continue
        value = parameters[name]
        if name == "stop_ids" and isinstance(value, str):  # gRPC parameters carry a list as its JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not valid(value):
            raise BadRequest(f"parameter {name!r}: got {json.dumps(value)[:80]}; expected {expected}")
        out[name] = value
    return out


def _budget(params: dict[str, Any], prompts: list[np.ndarray], positions: int, limits: GenerationLimits) -> int:
    """New tokens per prompt: as asked (within the cap and the positions every prompt leaves), else the default."""
    name = "max_tokens" if "max_tokens" in params else "max_new_tokens"
    left = min(positions - len(p) for p in prompts)
    longest = max(len(p) for p in prompts)
    if left < 1:
        raise BadRequest(f"prompt: {longest:,} tokens fill the model's {positions:,} positions; expected a shorter "
                         "prompt (nothing is left to generate)")
    if name not in params:
        return min(limits.default_new_tokens, limits.max_new_tokens, left)
    asked = params[name]
    if asked > limits.max_new_tokens:
        raise BadRequest(f"parameter {name!r}: got {asked:,}; this server generates at most "
                         f"{limits.max_new_tokens:,} new tokens per request (--max-new-tokens) -- ask for fewer")
    if asked > left:
        raise BadRequest(f"parameter {name!r}: got {asked:,}; a prompt of {longest:,} tokens leaves {left:,} of the "
                         f"model's {positions:,} positions -- ask for at most {left:,} or shorten the prompt")
    return asked


def parse_parameters(model: ServedModel, prompts: list[np.ndarray], parameters: Any, outputs: tuple[str, ...],
                     batched: bool, limits: GenerationLimits) -> GenerateRequest:
    """A checked ``GenerateRequest`` from checked prompts and raw request parameters."""
    if not isinstance(parameters, dict):
        raise BadRequest(f"parameters: got {json.dumps(parameters)[:80]}; expected an object")
    params = _checked(parameters)
    temperature = params.get("temperature", 1.0)
    strategy = params.get("strategy") or ("sample" if params.get("do_sample") is True else "greedy")
    if temperature == 0:
        strategy, temperature = "greedy", 1.0
    stop = params.get("stop", ())
    stop_ids = params.get("stop_ids", ())
    options = GenerationOptions(
        _budget(params, prompts, model.session.config.max_position_embeddings, limits), strategy, temperature,
        params.get("top_k", 0), params.get("top_p", 1.0), params.get("seed", 0),
        (stop_ids,) if _is_int(stop_ids) else tuple(stop_ids))
    if stop and model.tokenizer is None:
        raise BadRequest(f"parameter 'stop': model {model.name!r} has no tokenizer to match text with; use stop_ids")
    return GenerateRequest(prompts, options, outputs, batched, (stop,) if isinstance(stop, str) else tuple(stop),
                           params.get("details", False), params.get("timeout"))


def parse_infer(model: ServedModel, request: InferRequest, limits: GenerationLimits) -> GenerateRequest | None:
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
    return parse_parameters(model, sequences, request.parameters, wanted, batched, limits)


def _prompts(model: ServedModel, data: dict[str, Any]) -> tuple[list[Any], bool]:
    text, ids = data.get("text_input"), data.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("request body: give text_input (a string or a list of strings) or input_ids (a list of ids "
                         "or of id lists), one of them")
    if text is not None:
        if not (isinstance(text, str) or _is_str_list(text) and text):
            raise BadRequest(f"text_input: got {json.dumps(text)[:80]}; expected a string or a list of strings")
        if model.tokenizer is None:
            raise BadRequest(f"text_input: model {model.name!r} has no tokenizer; send input_ids")
        texts = [text] if isinstance(text, str) else text
        return [model.tokenizer.encode(t) for t in texts], not isinstance(text, str)
    if not isinstance(ids, list) or not ids:
        raise BadRequest(f"input_ids: got {json.dumps(ids)[:80]}; expected a list of ids or of id lists")
    batched = isinstance(ids[0], list)
    return (ids if batched else [ids]), batched


def parse_json(model: ServedModel, body: bytes, limits: GenerationLimits) -> GenerateRequest:
    """A generate-extension request body (``text_input`` or ``input_ids`` plus parameters)."""
    _check_can_generate(model)
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BadRequest('request body: expected a JSON object such as {"text_input": "...", "parameters": '
                         '{"max_tokens": 32}}')
    nested = data.get("parameters", {})
    if not isinstance(nested, dict):
        raise BadRequest(f"parameters: got {json.dumps(nested)[:80]}; expected an object")
    if "id" in data and not isinstance(data["id"], str):
        raise BadRequest(f"id: got {json.dumps(data['id'])[:80]}; expected a string")
    parameters = {**nested, **{k: v for k, v in data.items() if k not in ("text_input", "input_ids", "parameters",
                                                                           "id")}}
    prompts, batched = _prompts(model, data)
    sequences = model.session.check_sequences(prompts)
    return parse_parameters(model, sequences, parameters, GENERATION_OUTPUTS, batched, limits)


# ------------------------------------------------------------------------------------------------- running
#: How a host runs an iteration where the model's Session runs (a ``Runner``'s ``iterate``, ``service.py``).
Runner = Callable[[Callable[[], Iterator[Any]]], AsyncIterator[Any]]


async def stream(model: ServedModel, request: GenerateRequest, run: Runner) -> AsyncIterator[Generated]:
    """Each new token with its text, finish reasons in the extension's words. A prompt ends at its stop token, its
    budget, a stop sequence in its text, or the first token after the request's timeout; the decoding stops once
    every prompt has ended."""
    deadline = None if request.timeout_us is None else time.monotonic() + request.timeout_us / 1e6
    texts = [TextStream(model.tokenizer) if model.tokenizer is not None else None for _ in request.prompts]
    so_far = [""] * len(request.prompts)
    ended: set[int] = set()
    events = run(lambda: model.session.generate_stream(request.prompts, request.options))
    try:
        async for event in events:
            if event.prompt in ended:
                continue
            text = texts[event.prompt]
            piece = text.push(event.token) if text is not None else ""
            so_far[event.prompt] += piece
            reason = WIRE_REASONS[event.reason] if event.finished else None
            if reason is None and any(stop in so_far[event.prompt] for stop in request.stop_sequences):
                reason = STOP_SEQUENCE
            if reason is None and deadline is not None and time.monotonic() >= deadline:
                reason = TIMEOUT
            if reason is not None:
                ended.add(event.prompt)
                piece += text.flush() if text is not None else ""
            yield Generated(dataclasses.replace(event, finished=reason is not None, reason=reason), piece)
            if len(ended) == len(request.prompts):
                break
    finally:
        await events.aclose()


async def collect(model: ServedModel, request: GenerateRequest, run: Runner) -> list[list[Generated]]:
    """Every prompt's new tokens, in order."""
    out: list[list[Generated]] = [[] for _ in request.prompts]
    async for generated in stream(model, request, run):
        out[generated.event.prompt].append(generated)
    return out


# ------------------------------------------------------------------------------------------------ answers
def infer_response(model: ServedModel, request: InferRequest, generate: GenerateRequest,
                   generated: list[list[Generated]]) -> InferResponse:
    """The v2 answer: generated_ids (padded with -1), generated_text, lengths -- as the request asked."""
    tokens = [[g.event.token for g in prompt] for prompt in generated]
    longest = max(len(t) for t in tokens)
    ids = np.full((len(tokens), longest), PAD, dtype=np.int64)
    for row, new in enumerate(tokens):
        ids[row, :len(new)] = new
    arrays: dict[str, np.ndarray] = {GENERATED_IDS: ids, LENGTHS_OUTPUT: np.array([len(t) for t in tokens])}
    if model.tokenizer is not None:
        texts = np.empty(len(tokens), dtype=object)
        texts[:] = ["".join(g.piece for g in prompt).encode() for prompt in generated]
        arrays[GENERATED_TEXT] = texts
    if not generate.batched:
        arrays = {name: array[0] if name != LENGTHS_OUTPUT else array[:1] for name, array in arrays.items()}
    outputs = [(name, arrays[name], request.wants_binary(name)) for name in generate.outputs]
    return InferResponse(model.name, model.version, request.id, outputs)


def _token(model: ServedModel, event: TokenEvent) -> dict[str, Any]:
    """The extension's ``Token``: id, its own text, log-probability, and whether it is a control token."""
    tokenizer = model.tokenizer
    return {"id": event.token, "text": tokenizer.decode([event.token]) if tokenizer is not None else "",
            "logprob": event.logprob, "special": bool(tokenizer is not None and tokenizer.is_special(event.token))}


def json_answer(model: ServedModel, generate: GenerateRequest, generated: list[list[Generated]]) -> dict[str, Any]:
    """The generate extension's answer (lists when the request was a list)."""
    answers = []
    for prompt in generated:
        reason = prompt[-1].event.reason
        answer = {"text_output": "".join(g.piece for g in prompt) if model.tokenizer is not None else None,
                  "output_ids": [g.event.token for g in prompt], "finish_reason": reason}
        if generate.details:
            answer["details"] = {"finish_reason": reason, "logprobs": [_token(model, g.event) for g in prompt]}
        answers.append(answer)
    merged = answers[0] if not generate.batched else {key: [a[key] for a in answers] for key in answers[0]}
    return {"model_name": model.name, "model_version": model.version, **merged}


def sse_event(model: ServedModel, generated: Generated) -> bytes:
    event = generated.event
    data: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "prompt": event.prompt,
                            "step": event.step, "output_ids": [event.token], "text_output": generated.piece,
                            "finished": event.finished}
    if event.finished:
        data["finish_reason"] = event.reason
        data["details"] = {"finish_reason": event.reason, "token": _token(model, event)}
    return f"data: {json.dumps(data)}\n\n".encode()
