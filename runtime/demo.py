"""``reformer-rt demo``: the main job on the bundled demo model, end to end, in one command.

Loads the byte-level demo LM shipped inside the package, runs a batch of long sequences (held-out Python standard
library source, the demo model's evaluation corpus) through it, and prints the throughput with the machine it ran
on, the model's bits per character on that batch, and a short generated sample.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from reformer_rt.models import InputError, ReformerLM
from reformer_rt.models.lsh_op import select_implementation
from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.models.train_demo import corpus

DEFAULT_PROMPT = "def "


def demo_model_dir() -> Path:
    return Path(str(resources.files("reformer_rt.models") / "demo"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the bundled demo model on a batch of long sequences",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--batch", type=int, default=4, help="sequences in the long batch (default 4)")
    p.add_argument("--length", type=int, default=16384, help="tokens per sequence (default 16384)")
    p.add_argument("--generate", type=int, default=160, help="bytes to sample (default 160; 0 = skip)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"sampling prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def long_batch(tokenizer: ByteTokenizer, batch: int, length: int) -> torch.Tensor:
    """``batch`` consecutive windows of the held-out corpus (repeated if it is too short)."""
    _, held_out, _ = corpus()
    need = batch * length
    data = (held_out * (need // len(held_out) + 1))[:need]
    ids = torch.tensor(list(data), dtype=torch.long) + tokenizer.offset
    return ids.view(batch, length)


@torch.no_grad()
def sample(model: ReformerLM, tokenizer: ByteTokenizer, prompt: str, n: int, seed: int,
           temperature: float = 0.7, top_k: int = 20) -> str:
    """Top-k sampling, recomputing the (short) context each step: no cache, same model path as the batch."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise InputError("--prompt: got an empty prompt; expected at least one character")
    generator = torch.Generator().manual_seed(seed)
    window = 4 * model.config.lsh_attn_chunk_length
    for _ in range(n):
        logits = model(torch.tensor([ids[-window:]]))[0, -1] / temperature
        top = torch.topk(logits, top_k)
        choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
        ids.append(int(top.indices[choice]))
    return tokenizer.decode(ids)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.length < 2:
        raise InputError(f"--batch/--length: got {args.batch}/{args.length}; expected >= 1 and >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = demo_model_dir()
    model = ReformerLM.from_pretrained(directory)
    tokenizer = ByteTokenizer.load(directory)
    limit = model.config.max_position_embeddings
    if args.length > limit:
        raise InputError(f"--length: got {args.length}; expected at most {limit} (the demo model's "
                         "max_position_embeddings)")
    print(f"model: {directory} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.num_layers} layers {list(model.config.attn_layers)})")
    ids = long_batch(tokenizer, args.batch, args.length)
    print(f"batch: {args.batch} x {args.length:,} tokens of held-out Python source")
    model(ids[:, :256])  # warm-up: first-call allocations are not the model's speed
    started = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    seconds = time.perf_counter() - started
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    print(f"forward: {seconds:.2f} s, {ids.numel() / seconds:,.0f} tokens/s on {_machine()} "
          f"(PyTorch {torch.__version__}, LSH op: {select_implementation(ids.device)})")
    print(f"bits per character on the batch: {loss / math.log(2):.3f}")
    if args.generate:
        text = sample(model, tokenizer, args.prompt, args.generate, args.seed)
        print("sample:\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)
    return 0

