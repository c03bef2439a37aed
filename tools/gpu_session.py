"""The runtime on a CUDA GPU: ``python tools/gpu_session.py parity|headline --out FILE.json`` (a step of ``make
gpu-check``, which puts the checkout on the import path).

``parity``: the bundled demo model through ``Session(backend="torch", device="cuda")`` (Triton kernels) on the
demo's ragged long batch (16,384 / 12,288 / 7,000 / 3,000 tokens of held-out source) against the same checkpoint
on the CPU with the reference op, explained bucket by bucket. Two fp32 implementations agree to ~1e-5 on the
inputs of hashing, and a bucket is an argmax: where a token's two best rotated values are closer than that, the
devices may hash it differently, and every later position of that round's chunks moves with it (README, "Hash
near-ties"). So, for each sequence and LSH layer, with the qk each device fed to that layer:

* kernel: the Triton hash on the GPU's qk against the reference hash on the same qk. Mismatches are allowed only
  at ulp-level ties (top-2 gap <= ``KERNEL_TIE`` relative); any other one fails the check.
* flips: the reference hash of the GPU's qk against that of the CPU's qk -- caused by the inputs alone.
* PASS when: the Session equals the model run directly on the GPU (<= 1e-5); every kernel mismatch is an ulp tie;
  a sequence that hashes alike on both devices in every layer agrees on every valid logit within ``AGREE_TOL``;
  a sequence with flips has, up to its first flipped layer, hash inputs that differ by no more than fp32 noise
  (``NOISE`` relative), so each flip is a near-tie (its top-2 gap is below twice that difference). Such
  sequences report the share of positions within tolerance; they do not fail.

``headline``: one forward of the crime-and-punishment architecture (random weights) over its full 524,288 tokens,
B=1: through ``Session(dtype="float16")`` on CUDA asking for the last position's logits (the figure the target is
judged on; the torch backend computes the LM head at that position only), the same in fp32, the fp16 model called
directly (what the Session adds), and HF eager fp16 on the same weights (time and memory, or the out-of-memory
error it hits). Timing and memory as in ``reformer_rt.runtime.bench.gpu``.

Exit status: 0 passed, 1 failed (a parity criterion, or one of our own measurements raised), 2 no CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from reformer_rt.models import ReformerLM
from reformer_rt.models.attention import LSHSelfAttention
from reformer_rt.models.lsh import lsh_candidates, lsh_hash
from reformer_rt.models.presets import CRIME_AND_PUNISHMENT, demo_model_dir
from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.plugins.lsh_triton import lsh_hash_triton
from reformer_rt.plugins.parity import FP32_TOL
from reformer_rt.runtime.bench.gpu import timed
from reformer_rt.runtime.bench.gpu_report import HEADLINE, format_table, format_targets, headline_targets
from reformer_rt.runtime.bench.harness import Point, error_text, json_bytes, timestamp
from reformer_rt.runtime.commands.demo import AGREE_TOL, long_batch
from reformer_rt.runtime.hardware import gpu_info
from reformer_rt.runtime.session import Session

DEMO_LENGTHS = (16384, 12288, 7000, 3000)
#: Largest relative difference of the hash inputs (qk) between the devices accepted as fp32 noise.
NOISE = 1e-4
#: Relative top-2 gap within which the Triton hash and the reference may disagree on identical inputs (their fp32
#: dot products accumulate in different orders: a few ulps).
KERNEL_TIE = 1e-6
HEADLINE_ROW = "Session fp16 (last_logits)"


@torch.inference_mode()
def hash_inputs(model: ReformerLM, ids: list[int], device: str) -> tuple[torch.Tensor, list[tuple]]:
    """Logits [L, vocab] (CPU, fp32) of one sequence and, per LSH layer, (qk [1,H,L',D], mask [1,L'] int32, layer)
    as that layer hashed them (on the CPU; L' = L padded to the chunk multiple)."""
    captured: list[tuple] = []

    def capture(module: LSHSelfAttention, inputs: tuple) -> None:
        x, mask = inputs
        qk = module.query_key(x).view(*x.shape[:2], module.heads, module.head_dim).transpose(1, 2)
        captured.append((qk.float().cpu(), mask.to(torch.int32).cpu(), module))

    hooks = [m.register_forward_pre_hook(capture) for m in model.modules() if isinstance(m, LSHSelfAttention)]
    try:
        logits = model(torch.tensor([ids], device=device))[0].float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured


def _margins(qk: torch.Tensor, layer: LSHSelfAttention) -> torch.Tensor:
    """Relative gap between the two best rotated values, smallest over bucket factors: [1, H, n_hashes, L']."""
    gaps = []
    for scores in lsh_candidates(qk, layer.rotations.cpu(), layer.attrs):
        top2 = scores.topk(2, dim=-1).values
        gaps.append((top2[..., 0] - top2[..., 1]) / top2[..., 0].abs().clamp_min(1e-30))
    return torch.stack(gaps).amin(0)


def compare_layer(cpu: tuple, gpu: tuple) -> dict:
    """Bucket-level comparison of one LSH layer of one sequence (see the module docstring)."""
    qk_cpu, mask, layer = cpu
    qk_gpu = gpu[0]
    rotations, attrs, valid = layer.rotations.cpu().float(), layer.attrs, mask.bool()[:, None, None, :]
    ref_cpu, ref_gpu = lsh_hash(qk_cpu, rotations, mask, attrs), lsh_hash(qk_gpu, rotations, mask, attrs)
    triton = lsh_hash_triton(qk_gpu.cuda(), rotations.cuda(), mask.cuda(), attrs).long().cpu()
    kernel_wrong = (triton != ref_gpu) & valid
    flips = (ref_gpu != ref_cpu) & valid
    margins_gpu, margins_cpu = _margins(qk_gpu, layer), _margins(qk_cpu, layer)
    tokens = mask.bool()[0]
    noise = ((qk_gpu - qk_cpu)[:, :, tokens].abs().max() / qk_cpu[:, :, tokens].abs().max()).item()
    return {"kernel_mismatches": int(kernel_wrong.sum()),
            "kernel_unexplained": int((kernel_wrong & (margins_gpu > KERNEL_TIE)).sum()),
            "flips": int(flips.sum()), "hash_input_noise": noise,
            "largest_flip_margin": float(margins_cpu[flips].max()) if flips.any() else None}


def compare_sequence(cpu_model: ReformerLM, gpu_model: ReformerLM, ids: list[int], session_logits: np.ndarray) -> dict:
    cpu_logits, cpu_layers = hash_inputs(cpu_model, ids, "cpu")
    gpu_logits, gpu_layers = hash_inputs(gpu_model, ids, "cuda")
    layers = [compare_layer(c, g) for c, g in zip(cpu_layers, gpu_layers)]
    diff = (gpu_logits - cpu_logits).abs().amax(dim=-1)
    first_flip = next((i for i, layer in enumerate(layers) if layer["flips"]), None)
    upto = layers if first_flip is None else layers[:first_flip + 1]
    noise = max(layer["hash_input_noise"] for layer in upto)
    result = {"length": len(ids), "session_vs_direct": float(np.abs(session_logits - gpu_logits.numpy()).max()),
              "max_abs_diff": diff.max().item(), "within_tolerance": (diff <= AGREE_TOL).float().mean().item(),
              "first_flip_layer": first_flip, "hash_input_noise": noise, "layers": layers}
    problems = []
    if result["session_vs_direct"] > FP32_TOL:
        problems.append(f"Session differs from the direct model by {result['session_vs_direct']:.2e}")
    if any(layer["kernel_unexplained"] for layer in layers):
        problems.append("Triton bucket ids differ from the reference on identical inputs beyond ulp ties")
    if first_flip is None and result["max_abs_diff"] > AGREE_TOL:
        problems.append(f"no bucket differs, yet logits differ by {result['max_abs_diff']:.2e} > {AGREE_TOL:g}")
    if first_flip is not None and noise > NOISE:
        problems.append(f"hash inputs differ by {noise:.1e} relative before the first flip (> {NOISE:g} noise)")
    result["problems"] = problems
    return result


def _describe(seq: dict) -> str:
    head = f"{seq['length']:,} tokens: "
    if seq["problems"]:
        return head + "FAILED: " + "; ".join(seq["problems"])
    if seq["first_flip_layer"] is None:
        return head + (f"same buckets in every layer; max abs diff {seq['max_abs_diff']:.2e} on logits "
                       f"(<= {AGREE_TOL:g})")
    flips = sum(layer["flips"] for layer in seq["layers"])
    layer = seq["layers"][seq["first_flip_layer"]]
    return head + (f"{flips} bucket ids differ (first in LSH layer {seq['first_flip_layer']}: {layer['flips']}, "
                   f"top-2 gaps <= {layer['largest_flip_margin']:.1e} relative, hash inputs differ by "
                   f"{seq['hash_input_noise']:.1e}: near-ties); {seq['within_tolerance']:.1%} of positions within "
                   f"{AGREE_TOL:g}, max abs diff {seq['max_abs_diff']:.2e}")


def parity(out: Path) -> int:
    directory = demo_model_dir()
    sequences = long_batch(ByteTokenizer.load(directory), list(DEMO_LENGTHS))
    session = Session(directory, backend="torch", device="cuda")
    session.run([sequences[0][:256]])  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    started = time.perf_counter()
    logits = session.run(sequences)["logits"]
    seconds = time.perf_counter() - started
    cpu_model, gpu_model = ReformerLM.from_pretrained(directory), ReformerLM.from_pretrained(directory).cuda()
    results = [compare_sequence(cpu_model, gpu_model, ids, logits[i, :len(ids)]) for i, ids in enumerate(sequences)]
    passed = not any(r["problems"] for r in results)
    report = {"device": gpu_info().name, "criterion": __doc__.split("\n\n")[1], "session_seconds": seconds,
              "tokens": sum(DEMO_LENGTHS), "passed": passed, "sequences": results}
    out.write_bytes(json_bytes(report))
    print(f"Session(backend='torch', device='cuda') on {report['device']}: {len(sequences)} sequences, "
          f"{report['tokens']:,} tokens in {seconds:.2f} s; against the CPU reference:")
    for seq in results:
        print("  " + _describe(seq))
    print(f"session parity: {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


def _time_session(rows: list[Point], checkpoint: str, ids: np.ndarray, dtype: str) -> None:
    session = Session(checkpoint, backend="torch", device="cuda", max_tokens_per_batch=len(ids), dtype=dtype)
    name = "fp16" if dtype == "float16" else "fp32"
    timed(rows, HEADLINE, len(ids), f"Session {name} (last_logits)",
          lambda: session.run([ids], outputs=["last_logits"]))


def _time_model(rows: list[Point], checkpoint: str, tensor: torch.Tensor) -> None:
    model = ReformerLM.from_pretrained(checkpoint).half().cuda()
    timed(rows, HEADLINE, tensor.shape[1], "ReformerLM fp16 forward (all logits)", lambda: model(tensor))


def _time_hf(rows: list[Point], checkpoint: str, tensor: torch.Tensor) -> None:
    import transformers

    try:
        hf = transformers.ReformerModelWithLMHead.from_pretrained(checkpoint).half().cuda().eval()
    except Exception as exc:  # the baseline failing to load (out of memory included) is its result, not ours
        rows.append(Point(HEADLINE, "HF eager fp16", tensor.shape[1], error=error_text(exc)))
        return
    timed(rows, HEADLINE, tensor.shape[1], "HF eager fp16", lambda: hf(input_ids=tensor))


def headline(out: Path) -> int:
    config, rows = CRIME_AND_PUNISHMENT, []
    ids = np.random.default_rng(0).integers(0, config.vocab_size, config.max_position_embeddings)
    tensor = torch.from_numpy(ids)[None].cuda()
    with tempfile.TemporaryDirectory(prefix="reformer-rt-headline-") as checkpoint:
        torch.manual_seed(0)
        ReformerLM(config).save_pretrained(checkpoint)
        for dtype in ("float16", "float32"):
            _time_session(rows, checkpoint, ids, dtype)
            torch.cuda.empty_cache()  # each helper's model is gone once it returns
        _time_model(rows, checkpoint, tensor)
        torch.cuda.empty_cache()
        _time_hf(rows, checkpoint, tensor)
    ours = next((r for r in rows if r.impl == HEADLINE_ROW and r.error is None), None)
    targets = headline_targets(ours)
    device = gpu_info().name
    report = {"device": device, "timings": [r.to_json() for r in rows],
              "targets": [t.to_json() for t in targets]}
    out.write_bytes(json_bytes(report))
    print(format_table(rows, device, timestamp()) + "\n\n" + format_targets(targets))
    for row in rows:
        if row.error:
            print(f"- {row.impl}: {row.error}")
    failed = [r.impl for r in rows if r.error and not r.impl.startswith("HF")]
    print(f"headline: {'FAILED: ' + ', '.join(failed) if failed else 'measured'}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/gpu_session.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=("parity", "headline"))
    parser.add_argument("--out", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_session: no CUDA GPU visible to torch; this check needs one", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # both devices in IEEE fp32, as the CPU reference is
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return parity(args.out) if args.check == "parity" else headline(args.out)


if __name__ == "__main__":
    sys.exit(main())
