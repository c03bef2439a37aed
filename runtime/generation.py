"""Text generation on the torch backend: cached decoding of a batch of prompts, greedy or sampled, streamed.

    result = session.generate([[5, 7, 9], prompt_b], GenerationOptions(max_new_tokens=64))        # greedy
    result.tokens[1], result.finish_reasons[1], result.tokens_per_s
    sampling = GenerationOptions(64, strategy="sample", temperature=0.8, top_p=0.95, seed=1)
    for event in session.generate_stream(prompts, sampling):
        print(event.prompt, event.step, event.token, event.finished, event.reason)

The options travel as one ``GenerationOptions``, checked when it is made, from where a request becomes one (the
CLI's arguments, a served request's parameters) to the decoding loop.

Decoding is HF's cached path (``reformer_rt.models.decoding``; what it computes and how that differs from
recomputing the sequence: ``models/cache.py``). Batching: prompts of any lengths decode together, each row at its
own position with its own cache; consecutive prompts share a batch while their prompt + new tokens fit
``max_tokens_per_batch``; prompts of one length share a prefill (the model pads them alike, so no row sees
another), and a row that finishes leaves the batch. Each prompt's tokens are those it gets when generated alone.

Choosing tokens: ``greedy`` takes the first highest logit (as ``torch.argmax`` and HF do); ``sample`` divides
the logits by ``temperature``, keeps the ``top_k`` highest (0 = all) and the smallest set whose probability
reaches ``top_p`` (HF's warpers), and draws from a ``torch.Generator`` of its own per prompt, seeded with
``seed + prompt index`` -- so a prompt's sample does not depend on what shares its batch, and prompt i of a call
with seed s equals that prompt generated alone with seed s + i. Logits are moved to the CPU to choose, so a seed
gives the same tokens on CPU and CUDA wherever the logits agree. A token in ``stop_ids`` ends its prompt (it is
part of the output, like HF's EOS); otherwise a prompt ends after ``max_new_tokens``.

Backends: those that declare a decoder (``Backend.decoder``): torch only (CPU or CUDA). An ONNX Runtime or TensorRT
session raises ``BackendUnavailable``: a decoding step is not the exported graph -- it needs every layer's cache as
inputs and outputs and a data-dependent gather around the new token's bucket (README "Generation").
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from reformer_rt.models import InputError
from reformer_rt.models.decoding import DecodeCache, check_decoder, prefill, step
from reformer_rt.models.lsh_op import forced_kernels

from .backends import Backend, Decoder
from .errors import BackendUnavailable

STRATEGIES = ("greedy", "sample")
#: Why a prompt stopped: it produced one of ``stop_ids`` / it produced ``max_new_tokens``.
STOP, LENGTH = "stop", "length"


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How to generate; checked when made (``InputError`` naming the argument)."""

    max_new_tokens: int
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", _int_tuple(self.stop_ids))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens: got {self.max_new_tokens!r}; expected an integer >= 1")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy: got {self.strategy!r}; expected one of {STRATEGIES}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature < math.inf:
            raise InputError(f"temperature: got {self.temperature!r}; expected a number > 0 (1 = the model's "
                             "distribution; use strategy='greedy' for the most likely token)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k: got {self.top_k!r}; expected an integer >= 0 (0 = no limit)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p: got {self.top_p!r}; expected a number in (0, 1] (1 = no limit)")
        if not _is_int(self.seed) or self.seed < 0:
            raise InputError(f"seed: got {self.seed!r}; expected an integer >= 0")


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of one prompt, in the order ``generate_stream`` yields them (step by step; within a
    step, by prompt index; a batch of prompts at a time).

    ``prompt``: the prompt's index in the call. ``step``: 0 for its first new token. ``token``: the id.
    ``finished``: True on the prompt's last token -- no more events for it follow. ``reason``: None until then,
    then ``"stop"`` (the token is one of ``stop_ids``) or ``"length"`` (``max_new_tokens`` reached).
    ``logprob``: the token's log-probability under the model's next-token distribution (before temperature and
    the top-k / top-p filters)."""

    prompt: int
    step: int
    token: int
    finished: bool
    reason: str | None
    logprob: float = 0.0


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What ``Session.generate`` returns: per prompt, its new token ids (prompt excluded) and why it stopped;
    timing: ``prefill_s`` (the prompts' forward passes, which also give each prompt's first token) and
    ``decode_s`` (the cached steps that give every later token)."""

    tokens: tuple[tuple[int, ...], ...]
    finish_reasons: tuple[str, ...]
    prefill_s: float
    decode_s: float

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the cached steps (each prompt's first token comes from its prefill)."""
        stepped = self.new_tokens - len(self.tokens)
        return stepped / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass
class _Clock:
    prefill_s: float = 0.0
    decode_s: float = 0.0


def generate(backend: Backend, prompts: Sequence[np.ndarray], options: GenerationOptions,
             max_tokens_per_batch: int) -> GenerationResult:
    """Every prompt's new tokens (see the module docstring); ``prompts`` are checked int64 id arrays."""
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = [LENGTH] * len(prompts)
    clock = _Clock()
    decoder = _checked_decoder(backend, prompts, options)
    for event in _stream(decoder, prompts, options, max_tokens_per_batch, clock):
        tokens[event.prompt].append(event.token)
        if event.finished:
            reasons[event.prompt] = event.reason or LENGTH
    return GenerationResult(tuple(map(tuple, tokens)), tuple(reasons), clock.prefill_s, clock.decode_s)


def generate_stream(backend: Backend, prompts: Sequence[np.ndarray], options: GenerationOptions,
                    max_tokens_per_batch: int) -> Iterator[TokenEvent]:
    """The tokens of ``generate`` as ``TokenEvent``s, each yielded as soon as it is chosen. Everything that can be
    checked before decoding is checked here, before the first event is asked for."""
    decoder = _checked_decoder(backend, prompts, options)
    return _stream(decoder, prompts, options, max_tokens_per_batch, _Clock())


def _checked_decoder(backend: Backend, prompts: Sequence[np.ndarray], options: GenerationOptions) -> Decoder:
    """The backend's decoder, once it is known to generate these prompts with these options."""
    decoder = backend.decoder
    if decoder is None:
        raise BackendUnavailable(f"generate: cached decoding runs on the torch backend; this session uses "
                                 f"{backend.name} -- open the checkpoint directory with backend='torch' (CPU or CUDA). "
                                 "An exported graph has no decoding step: it would need every layer's cache as "
                                 "inputs and outputs and a data-dependent gather around each new token's bucket")
    model = decoder.model
    check_decoder(model)
    limit = model.config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if len(prompt) + options.max_new_tokens > limit:
            raise InputError(f"prompt {i}: {len(prompt):,} tokens + max_new_tokens={options.max_new_tokens:,} "
                             f"exceeds max_position_embeddings={limit:,}; expected at most {limit:,} positions -- "
                             "shorten the prompt or generate fewer tokens")
    bad = [t for t in options.stop_ids if t >= model.config.vocab_size]
    if bad:
        raise InputError(f"stop_ids: got {bad}; expected ids in [0, {model.config.vocab_size - 1}]")
    return decoder


def _stream(decoder: Decoder, prompts: Sequence[np.ndarray], options: GenerationOptions,
            max_tokens_per_batch: int, clock: _Clock) -> Iterator[TokenEvent]:
    for group in _groups([len(p) for p in prompts], options.max_new_tokens, max_tokens_per_batch):
        yield from _decode_group(decoder, [prompts[i] for i in group], group, options, clock)


def _groups(lengths: list[int], new_tokens: int, budget: int) -> list[list[int]]:
    """Consecutive prompts whose (prompt + new tokens) fit ``budget`` together; a prompt over it goes alone."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if groups and used + n + new_tokens <= budget:
            groups[-1].append(i)
            used += n + new_tokens
        else:
            groups.append([i])
            used = n + new_tokens
    return groups


def _decode_group(decoder: Decoder, prompts: list[np.ndarray], indices: list[int], options: GenerationOptions,
                  clock: _Clock) -> Iterator[TokenEvent]:
    """Prefill, then step until every prompt of the group has finished; yields as tokens are chosen. (Inference
    mode and the decoder's kernels are entered per forward pass, never across a ``yield``: they would leak into the
    caller's code, and a server's worker thread would not have them when it resumes the stream.)"""
    started = time.perf_counter()
    cache, logits = _prefill_group(decoder, prompts, options.max_new_tokens)
    clock.prefill_s += time.perf_counter() - started
    generators = [_generator(options, index) for index in indices]
    active = list(range(len(prompts)))  # rows of the group still generating, in prompt order
    for step_index in range(options.max_new_tokens):
        chosen = _choose(logits, options, [generators[row] for row in active])
        logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(chosen)), chosen].tolist()
        kept = []
        for position, (row, token) in enumerate(zip(active, chosen)):
            reason = STOP if token in options.stop_ids else LENGTH if step_index + 1 == options.max_new_tokens else None
            yield TokenEvent(indices[row], step_index, token, reason is not None, reason, logprobs[position])
            if reason is None:
                kept.append(position)
        if not kept:
            return
        started = time.perf_counter()
        if len(kept) < len(active):
            cache = cache.select(kept)
            active = [active[k] for k in kept]
        logits = _step(decoder, cache, [chosen[k] for k in kept])
        clock.decode_s += time.perf_counter() - started


def _prefill_group(decoder: Decoder, prompts: list[np.ndarray], new_tokens: int) -> tuple[DecodeCache, torch.Tensor]:
    """A cache for the group, filled by one prefill per prompt length -> (cache, next-token logits [b, vocab])."""
    model = decoder.model
    longest = max(len(p) for p in prompts)
    with torch.inference_mode(), forced_kernels(decoder.kernels):
        cache = DecodeCache.empty(model, len(prompts), longest + new_tokens, longest)
        device = model.lm_head.decoder.weight.device
        logits = torch.empty(len(prompts), model.config.vocab_size)
        for length in sorted({len(p) for p in prompts}):
            rows = [row for row, p in enumerate(prompts) if len(p) == length]
            ids = torch.from_numpy(np.stack([prompts[row] for row in rows])).to(device)
            logits[rows] = prefill(model, cache, rows, ids).float().cpu()
    return cache, logits


def _step(decoder: Decoder, cache: DecodeCache, tokens: list[int]) -> torch.Tensor:
    model = decoder.model
    with torch.inference_mode(), forced_kernels(decoder.kernels):
        ids = torch.tensor(tokens, dtype=torch.int64, device=model.lm_head.decoder.weight.device)
        return step(model, cache, ids).float().cpu()


def _generator(options: GenerationOptions, index: int) -> torch.Generator | None:
    if options.strategy == "greedy":
        return None
    return torch.Generator(device="cpu").manual_seed(options.seed + index)


def _choose(logits: torch.Tensor, options: GenerationOptions, generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [b, vocab] (CPU, fp32)."""
    if options.strategy == "greedy":
        return logits.argmax(dim=-1).tolist()
    return [_sample(row, options, generator) for row, generator in zip(logits, generators)]


def _sample(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> int:
    """Temperature, then top-k, then top-p (HF's TopPLogitsWarper: drop the least likely tokens whose total
    probability is at most 1 - top_p, keeping at least one), then one draw."""
    scores = logits / options.temperature
    if 0 < options.top_k < scores.shape[-1]:
        kth = torch.topk(scores, options.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p < 1:
        ascending, order = torch.sort(scores)
        drop = torch.cumsum(torch.softmax(ascending, dim=-1), dim=-1) <= 1 - options.top_p
        drop[-1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_tuple(values: object) -> tuple[int, ...]:
    """``stop_ids`` as a tuple of non-negative ints (one int is accepted as a single id)."""
    items = (values,) if _is_int(values) else values
    if not isinstance(items, (list, tuple, set, frozenset, np.ndarray)) or not all(_is_int(v) for v in items):
        raise InputError(f"stop_ids: got {values!r}; expected a list of token ids")
    if any(int(v) < 0 for v in items):
        raise InputError(f"stop_ids: got {values!r}; expected ids >= 0")
    return tuple(int(v) for v in items)
