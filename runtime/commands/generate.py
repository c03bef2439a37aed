"""``reformer-rt generate``: continue a prompt with a language model, streaming each token as it is chosen.

``--prompt TEXT`` (``-`` reads stdin) prints the prompt, then the generated text as it comes (UTF-8; a
character split over several byte tokens is printed once complete). ``--ids FILE`` (a JSON list of id lists, or a
2-D .npy int array: several prompts, decoded together) prints one JSON line per token: ``{"prompt", "step",
"token", "finished", "reason"}``. Either way stdout is flushed per token, and a one-line summary (tokens, finish
reasons, tokens/s) goes to stderr. Cached decoding runs on the torch backend (CPU, or CUDA with ``--device``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from reformer_rt.models import InputError

from ..artifacts import artifact_kind
from ..generation import STRATEGIES, GenerationOptions, TokenEvent
from ..session import Session
from ..tokenizers import TextStream, Tokenizer, load_tokenizer, prompt_ids
from .run import _read_ids


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt (cached decoding), streaming tokens to stdout",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("model", type=Path, help="checkpoint directory of a causal language model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (- = read stdin)")
    source.add_argument("--ids", type=Path, help="JSON list of token-id lists, or a 2-D .npy array")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="sample: divide the logits by this (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample: only the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample: only the most likely tokens covering p")
    p.add_argument("--seed", type=int, default=0, help="sample: seed of prompt 0 (prompt i uses seed + i)")
    p.add_argument("--stop-id", type=int, action="append", default=[], dest="stop_ids",
                   help="token id that ends a prompt's generation (repeatable; default: the config's eos_token_id "
                        "with --prompt, none with --ids)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--tokenizer", type=Path, help="directory holding the tokenizer (default: the model's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads < 0:
        raise InputError(f"--threads: got {args.threads}; expected an integer >= 0 (0 = all cores)")
    kind = artifact_kind(args.model)
    if kind != "checkpoint":
        raise InputError(f"{args.model}: got an {kind} file; expected a checkpoint directory -- cached decoding runs "
                         "on the torch backend, from the checkpoint the file was exported from")
    session = Session(args.model, backend="torch", device=args.device, dtype=args.dtype, threads=args.threads)
    if args.ids is not None:
        prompts, tokenizer, stop_ids = _read_ids(args.ids), None, args.stop_ids
    else:
        tokenizer = _tokenizer(session, args.tokenizer)
        prompts = [prompt_ids(tokenizer, _stdin_text() if args.prompt == "-" else args.prompt)]
        eos = session.config.eos_token_id
        stop_ids = args.stop_ids or ([] if eos is None else [eos])
    options = GenerationOptions(args.max_new_tokens, args.strategy, args.temperature, args.top_k, args.top_p, args.seed,
                                stop_ids)
    events = session.generate_stream(prompts, options)
    clock = _Clock()
    if tokenizer is None:
        finished = _stream_ids(clock.timed(events))
    else:
        sys.stdout.write(tokenizer.decode(list(prompts[0])))
        finished = _stream_text(clock.timed(events), TextStream(tokenizer))
    print(clock.summary(finished, f"{session.backend} on {session.device}"), file=sys.stderr)
    return 0


class _Clock:
    """Times a stream of events: until the first (the prefill) and after it (the cached steps)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first = self.last = self.start
        self.count = 0

    def timed(self, events: Iterable[TokenEvent]) -> Iterator[TokenEvent]:
        for event in events:
            self.last = time.perf_counter()
            if not self.count:
                self.first = self.last
            self.count += 1
            yield event

    def summary(self, finished: list[TokenEvent], where: str) -> str:
        reasons = ", ".join(event.reason or "" for event in finished)
        stepped, seconds = self.count - len(finished), self.last - self.first
        rate = f"{stepped / seconds:,.1f} tokens/s after it" if stepped and seconds > 0 else "no later steps"
        return (f"generated {self.count} tokens ({reasons}) with {where}: first token after "
                f"{self.first - self.start:.2f} s (prefill), {rate}")


def _stream_ids(events: Iterable[TokenEvent]) -> list[TokenEvent]:
    finished = []
    for event in events:
        print(json.dumps({"prompt": event.prompt, "step": event.step, "token": event.token,
                          "finished": event.finished, "reason": event.reason}), flush=True)
        if event.finished:
            finished.append(event)
    return sorted(finished, key=lambda e: e.prompt)


def _stream_text(events: Iterable[TokenEvent], text: TextStream) -> list[TokenEvent]:
    finished = []
    for event in events:
        sys.stdout.write(text.push(event.token))
        sys.stdout.flush()
        if event.finished:
            finished.append(event)
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()
    return finished


def _stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--prompt -: stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "expected UTF-8 text -- pass token ids with --ids") from exc


def _tokenizer(session: Session, directory: Path | None) -> Tokenizer:
    if directory is not None and not directory.is_dir():
        raise InputError(f"--tokenizer: {directory} is not a directory; expected the directory holding the model's "
                         "tokenizer.json or spiece.model")
    return load_tokenizer(directory or session.path, session.config, required=directory is not None)
