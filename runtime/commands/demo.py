"""``reformer-rt demo``: the main job on the bundled demo model, end to end, in one command.

Bundled byte-level LM -> ONNX export (portable form, made once and cached) -> a Session on the best backend
this machine has -> a ragged batch of long sequences (held-out Python standard library source, the demo model's
evaluation text) -> throughput on this machine -> parity with the PyTorch model on the same batch (bits per
character of both, the share of positions that agree, and what explains the others) -> a short sample from
cached decoding on the torch backend, with its tokens/s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from reformer_rt.models import InputError, ReformerLM
from reformer_rt.models.attention import LSHSelfAttention
from reformer_rt.models.lsh import lsh_candidates
from reformer_rt.models.presets import demo_model_dir
from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.models.train_demo import corpus

from ..generation import GenerationOptions
from ..hardware import machine_name
from ..session import BACKENDS, Session
from ..tokenizers import prompt_ids

DEFAULT_PROMPT = "def "


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="bundled model -> ONNX -> best backend -> long ragged batch -> parity",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--lengths", default="16384,12288,7000,3000",
                   help="comma-separated token counts of the batch's sequences (default 16384,12288,7000,3000)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--generate", type=int, default=160, help="bytes to sample (default 160; 0 = skip)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"sampling prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def long_batch(tokenizer: ByteTokenizer, lengths: list[int]) -> list[list[int]]:
    """Consecutive slices of the held-out corpus, one per requested length (wrapping if it runs out)."""
    _, held_out, _ = corpus()
    data = held_out * (sum(lengths) // len(held_out) + 1)
    out, start = [], 0
    for n in lengths:
        out.append([b + tokenizer.offset for b in data[start:start + n]])
        start += n
    return out


def sample(session: Session, tokenizer: ByteTokenizer, prompt: str, n: int, seed: int,
           temperature: float = 0.7, top_k: int = 20) -> tuple[str, float]:
    """Top-k sampling by cached decoding (``session`` on the torch backend) -> (text, tokens/s of the steps)."""
    ids = prompt_ids(tokenizer, prompt)
    stop_ids = [] if session.config.eos_token_id is None else [session.config.eos_token_id]
    options = GenerationOptions(n, "sample", temperature=temperature, top_k=top_k, seed=seed, stop_ids=stop_ids)
    result = session.generate([ids], options)
    return tokenizer.decode(ids + list(result.tokens[0])), result.tokens_per_s


def _lengths(text: str, limit: int) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InputError(f"--lengths: got {text!r}; expected comma-separated integers") from exc
    if not lengths or min(lengths) < 2 or max(lengths) > limit:
        raise InputError(f"--lengths: got {text!r}; expected lengths in [2, {limit}] (the demo model's "
                         "maximum input length)")
    return lengths


def _stage(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"... {text}", file=sys.stderr, flush=True)


def _check_counts(args: argparse.Namespace) -> None:
    for flag, value in (("--generate", args.generate), ("--threads", args.threads), ("--seed", args.seed)):
        if value < 0:
            raise InputError(f"{flag}: got {value}; expected an integer >= 0")


def run(args: argparse.Namespace) -> int:
    _check_counts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = demo_model_dir()
    model = ReformerLM.from_pretrained(directory)
    tokenizer = ByteTokenizer.load(directory)
    lengths = _lengths(args.lengths, model.config.max_input_length)
    if args.generate:
        prompt_ids(tokenizer, args.prompt)  # refuse a bad prompt now, not after the long run
    print(f"model: bundled demo LM, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.num_layers} layers {'/'.join(model.config.attn_layers)}, "
          f"{model.config.num_hashes} hash rounds")
    _stage(args.quiet, "opening a session (the first run exports the model to ONNX, once)")
    session = Session(directory, backend=args.backend, threads=args.threads, progress=not args.quiet)
    print(f"backend: {session.backend} ({session.backend_reason})")
    sequences = long_batch(tokenizer, lengths)
    session.run([seq[:256] for seq in sequences[:1]])  # warm-up: first-call allocations are not the speed
    _stage(args.quiet, f"running {len(lengths)} sequences, {sum(lengths):,} tokens")
    started = time.perf_counter()
    result = session.run(sequences)
    seconds = time.perf_counter() - started
    logits, plan = result["logits"], result.plan
    print(f"batch: {len(lengths)} sequences of {', '.join(f'{n:,}' for n in lengths)} tokens -> "
          f"{len(plan.batches)} micro-batches, padding waste {plan.padding_waste:.1%}")
    print(f"throughput: {sum(lengths) / seconds:,.0f} tokens/s ({seconds:.2f} s) on {machine_name()}")
    _stage(args.quiet, "checking every output against the PyTorch model")
    _report_parity(model, sequences, logits, session.backend)
    if args.generate:
        _stage(args.quiet, "sampling with cached decoding (torch backend)")
        generator = session if session.can_decode else Session(directory, backend="torch", threads=args.threads)
        text, rate = sample(generator, tokenizer, args.prompt, args.generate, args.seed)
        print(f"generation: {rate:,.0f} tokens/s (cached decoding, torch on {generator.device}; the forward pass "
              f"above: {sum(lengths) / seconds:,.0f} tokens/s)")
        print("sample:\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)
    return 0


#: A position "agrees" with PyTorch within this (logits). fp32 backends differ by ~1e-5..1e-4 on long inputs.
AGREE_TOL = 1e-3


@torch.no_grad()
def _report_parity(model: ReformerLM, sequences: list[list[int]], logits: np.ndarray, backend: str) -> None:
    """What a user can judge first -- bits per character of both runs on the same batch, and the share of positions
    whose logits agree -- then, per sequence that differs, the hashing's closest tie, which explains it."""
    reference = [model(torch.tensor([seq]))[0].numpy() for seq in sequences]
    agree, total, closest, outliers = 0, 0, 0.0, []
    for i, (seq, expected) in enumerate(zip(sequences, reference)):
        diff = np.abs(logits[i, :len(seq)] - expected).max(axis=-1)  # [n]: worst logit per position
        off = diff > AGREE_TOL
        agree, total = agree + int((~off).sum()), total + len(seq)
        closest = max(closest, float(diff[~off].max(initial=0.0)))
        if off.any():
            outliers.append((i, len(seq), int(off.sum()), int(np.argmax(off)), float(diff.max())))
    ours = _bits_per_char(logits, sequences)
    theirs = _bits_per_char(reference, sequences)
    print(f"parity with PyTorch on the same batch: bits per character {ours:.4f} ({backend}) vs {theirs:.4f} "
          f"(PyTorch); {agree:,} of {total:,} positions ({agree / total:.2%}) agree within {AGREE_TOL:g} on every "
          f"logit (max abs diff there {closest:.1e})")
    for i, n, count, first, worst in outliers:
        gap = hash_tie_gap(model, sequences[i])
        print(f"  sequence {i} ({n:,} tokens): {count:,} positions from {first:,} on differ by up to {worst:.2f}; "
              f"its closest LSH hash tie is {gap:.1e} relative -- a bucket that two fp32 implementations may "
              "assign differently, moving that round's chunks (README: 'Hash near-ties'); the bits per character "
              "above say what it costs")


@torch.no_grad()
def hash_tie_gap(model: ReformerLM, seq: list[int]) -> float:
    """Smallest relative gap between the two best rotated values of any (layer, head, round, position)."""
    gaps: list[float] = []

    def measure(module: torch.nn.Module, inputs: tuple) -> None:
        x, mask = inputs
        qk = module.query_key(x).view(*x.shape[:2], module.heads, module.head_dim).transpose(1, 2)
        valid = (mask != 0)[:, None, None, :]  # padding (to the chunk multiple) gets its own bucket: no tie
        for scores in lsh_candidates(qk, module.rotations, module.attrs):
            top2 = scores.topk(2, dim=-1).values
            gap = (top2[..., 0] - top2[..., 1]) / top2[..., 0].abs()
            gaps.append(float(gap.masked_fill(~valid, float("inf")).min()))

    hooks = [m.register_forward_pre_hook(measure) for m in model.modules() if isinstance(m, LSHSelfAttention)]
    try:
        model(torch.tensor([seq]))
    finally:
        for hook in hooks:
            hook.remove()
    return min(gaps) if gaps else float("inf")


def _bits_per_char(logits: np.ndarray | list[np.ndarray], sequences: list[list[int]]) -> float:
    total, count = 0.0, 0
    for row, seq in zip(logits, sequences):
        x = torch.from_numpy(row[:len(seq) - 1])
        total += F.cross_entropy(x, torch.tensor(seq[1:]), reduction="sum").item()
        count += len(seq) - 1
    return total / count / math.log(2)
