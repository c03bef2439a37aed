"""Train the bundled demo model: a small byte-level Reformer LM on the Python standard library's source.

    python -m reformer_rt.models.train_demo --out models/demo

The corpus exists on every machine without network: the top-level ``*.py`` files of the running interpreter's
standard library, sorted by name; every 10th file is held out for evaluation. Same Python version + same seed +
same step count gives the same model (CPU, ``torch.use_deterministic_algorithms``). Reported metric: held-out
bits per character (byte), measured on windows of the training length.

The architecture is the crime-and-punishment layout shrunk (local/LSH alternating, axial positions, factorized
buckets, two hash rounds). The row table of the axial position embeddings is fixed at zero during training, so
position information is periodic with the training length: the model can then run on inputs far longer than it
was trained on (the demo measures throughput at such lengths) without meeting untrained position rows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ReformerConfig
from .modeling import ReformerLM
from .tokenizer import ByteTokenizer

TRAIN_LENGTH = 512

DEMO_CONFIG = ReformerConfig(
    vocab_size=ByteTokenizer().vocab_size,
    hidden_size=128,
    num_attention_heads=4,
    attention_head_size=32,
    attn_layers=("local", "lsh", "local", "lsh"),
    feed_forward_size=384,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    is_decoder=True,
    axial_pos_embds=True,
    axial_pos_shape=(256, TRAIN_LENGTH),  # 131,072 positions: long-sequence demos fit
    axial_pos_embds_dim=(32, 96),
    max_position_embeddings=256 * TRAIN_LENGTH,
    lsh_attn_chunk_length=64,
    lsh_num_chunks_before=1,
    lsh_num_chunks_after=0,
    num_hashes=2,
    num_buckets=(4, 4),  # 16 buckets: two per chunk at the training length, as the paper recommends
    hash_seed=0,
    local_attn_chunk_length=64,
    local_num_chunks_before=1,
    local_num_chunks_after=0,
    chunk_size_lm_head=0,
    pad_token_id=0,
    eos_token_id=1,
)


def corpus() -> tuple[bytes, bytes, list[str]]:
    """(train bytes, held-out bytes, file names) from the standard library's top-level modules."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise SystemExit("train_demo: no standard-library sources found (is this a stripped Python?)")
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10)
    held_out = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 == 0)
    return train, held_out, [f.name for f in files]


def _windows(data: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return torch.stack([data[s:s + TRAIN_LENGTH] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: ReformerLM, data: torch.Tensor, windows: int = 96) -> float:
    """Held-out bits per byte on ``windows`` evenly spaced windows of the training length."""
    model.eval()
    starts = torch.linspace(0, len(data) - TRAIN_LENGTH - 1, windows).long()
    total = 0.0
    for batch in _windows(data, starts).split(8):
        logits = model(batch)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
    return total / (windows * (TRAIN_LENGTH - 1)) / math.log(2)


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    tokenizer = ByteTokenizer()
    train_bytes, held_bytes, names = corpus()
    train_ids = torch.tensor(list(train_bytes), dtype=torch.long) + tokenizer.offset
    held_ids = torch.tensor(list(held_bytes), dtype=torch.long) + tokenizer.offset

    model = ReformerLM(DEMO_CONFIG)
    rows = model.reformer.embeddings.position_embeddings.weights[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "position_embeddings" not in name:
                torch.nn.init.normal_(p, std=0.02)
        rows.zero_()
    rows.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sampler = torch.Generator().manual_seed(seed)
    log: list[dict] = []
    started = time.time()
    for step in range(1, steps + 1):
        model.train()
        warmup = min(1.0, step / 100)
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(train_ids) - TRAIN_LENGTH - 1, (batch_size,), generator=sampler)
        batch = _windows(train_ids, starts)
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps:
            entry = {"step": step, "train_bpc": round(loss.item() / math.log(2), 4),
                     "elapsed_s": round(time.time() - started, 1)}
            if step % 200 == 0 or step == steps:
                entry["held_out_bpc"] = round(evaluate(model, held_ids), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)

    summary = {
        "held_out_bpc": log[-1]["held_out_bpc"],
        "steps": steps, "batch_size": batch_size, "train_length": TRAIN_LENGTH, "lr": lr, "seed": seed,
        "train_bytes": len(train_bytes), "held_out_bytes": len(held_bytes), "files": len(names),
        "python": platform.python_version(), "torch": torch.__version__, "train_seconds": round(time.time() - started),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save(out)
    (out / "training_log.json").write_text(json.dumps({"summary": summary, "log": log}, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    summary = train(args.out, args.steps, args.batch_size, args.lr, args.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
