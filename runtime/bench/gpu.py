"""GPU check and benchmark of the Triton LSH kernels: ``python -m reformer_rt.runtime.bench.gpu --out DIR``.

One run, on one CUDA GPU, everything in the same process so every figure shares the device:

1. Parity: ``lsh_attention_triton`` against ``lsh_attention_reference`` (on the same GPU) on the enwik8 LSH layer
   shape (B=1, 8 heads x 128, 4 hashes, chunk 256, 1 chunk before, 0 after, causal, ragged mask) at each length,
   fp32 and fp16, with the criteria of ``reformer_rt.plugins.parity`` (fp32 <= 1e-5; fp16 <= 4 * 2^-11 * max|v|;
   bucket ids and sort order equal).
2. LSH layer timings (d_model 1024, fp16) at each length: the op alone (ours vs dense causal SDPA) and the whole
   layer with projections (our ``LSHSelfAttention`` with the Triton kernels, the same module with the reference,
   transformers' ``LSHSelfAttention`` with the same weights).
3. 12-layer enwik8-like model forward, fp16, at 16K and 64K: our ``ReformerModel``, transformers'
   ``ReformerModel`` with the same weights, and the baseline to beat, a dense 12-layer transformer of the same
   width with FlashAttention (``dense_baseline``). ``--profile`` adds per-kernel CUDA times of our model at the
   longest length (torch.profiler).
4. The op and model targets (``gpu_report.benchmark_targets``), each met or missed with its ratio.

Timing: the median of CUDA-event-timed calls after one warm-up call (which also compiles), as many as fit in
~300 ms (3 to 20). Not ``triton.testing.do_bench``: it calls the function 5 times just to estimate its duration
and flushes the L2 cache between calls -- seconds per point for the slow baselines (HF at 64K takes ~0.5 s a
call) in a run that must fit in a few minutes, and a cold cache the model forwards never see. Memory: peak
``torch.cuda.max_memory_allocated`` during one call, as extra (minus what was allocated before it) and total.
Each measurement is a ``harness.Point`` (``gpu_report`` tells how its memory is read); the report starts with the
harness's ``Provenance`` (GPU, date, versions). ``bench.json`` is rewritten after each section, so a run cut short
keeps what it measured; ``bench.md`` and the printed tables come at the end, with the GPU name and date.

Known limits: transformers draws its hash rotations from the CUDA generator inside ``forward``, so its outputs
differ from ours on GPU and are timed, not compared (HF parity is checked on CPU in ``tests/models``). A failing
measurement is recorded as n/a with its error and the run goes on. Exit status: 0 parity passed, 1 a parity
check failed, 2 no CUDA device or an unusable ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from reformer_rt.models import InputError, LSHAttrs, ReformerConfig, ReformerModel
from reformer_rt.models.attention import LSHSelfAttention, lsh_attrs
from reformer_rt.models.lsh_op import forced_kernels
from reformer_rt.plugins.lsh_triton import lsh_attention_triton
from reformer_rt.plugins.parity import compare, random_inputs

from .dense_baseline import DenseTransformer
from .gpu_report import (
    DENSE_MODEL, DENSE_OP, EXTRA_BYTES, HF_MODEL, LAYER, MODEL, OURS_MODEL, OURS_OP, ParityRow, benchmark_targets,
    format_parity, format_table, format_targets,
)
from .harness import Point, Provenance, error_text, json_bytes, make_out_dir, peak_memory

DEFAULT_LENGTHS = (4096, 16384, 65536)
MODEL_LENGTHS = (16384, 65536)
#: enwik8 (google/reformer-enwik8) hyper-parameters; num_buckets is resolved per length as HF would.
ENWIK8 = dict(
    vocab_size=258, hidden_size=1024, num_attention_heads=8, attention_head_size=128, feed_forward_size=4096,
    attn_layers=("local", "lsh") * 6, is_decoder=True, num_hashes=4, lsh_attn_chunk_length=256,
    lsh_num_chunks_before=1, lsh_num_chunks_after=0, local_attn_chunk_length=128, local_num_chunks_before=1,
    local_num_chunks_after=0, axial_pos_shape=(128, 512), axial_pos_embds_dim=(256, 768),
    max_position_embeddings=65536, hash_seed=0,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reformer_rt.runtime.bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for bench.json and bench.md")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help="sequence lengths of the parity checks and layer timings (multiples of 256)")
    parser.add_argument("--skip-model", action="store_true", help="skip the 12-layer model timings")
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA times of our 12-layer model")
    return parser.parse_args(argv)


def measure(fn: Callable[[], object], target_ms: float = 300.0) -> tuple[float, int, int, str]:
    """(median seconds, peak extra bytes, peak total bytes, how the peak was measured) of ``fn`` after one warm-up
    call; 3 to 20 timed calls."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    peak, memory = peak_memory(cuda=True)
    reps = min(20, max(3, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / 1e3, peak - base, peak, memory


def timed(rows: list[Point], what: str, length: int, impl: str, fn: Callable[[], object]) -> None:
    """Append the measurement of ``fn`` to ``rows``, or its error (out of memory included)."""
    try:
        with torch.inference_mode():
            seconds, extra, peak, memory = measure(fn)
        rows.append(Point(what, impl, length, seconds=seconds, peak_bytes=peak, memory=memory,
                          details={EXTRA_BYTES: extra}))
    except Exception as exc:  # one failed measurement must not lose the others
        rows.append(Point(what, impl, length, error=error_text(exc)))
    torch.cuda.empty_cache()


def _config(length: int, layers: tuple[str, ...]) -> ReformerConfig:
    return ReformerConfig(**{**ENWIK8, "attn_layers": layers}).resolved(length)


def _head_shape(length: int) -> tuple[int, int, int, int]:
    return (1, ENWIK8["num_attention_heads"], length, ENWIK8["attention_head_size"])


def check_parity(length: int, dtype: torch.dtype) -> ParityRow:
    attrs = lsh_attrs(_config(length, ("lsh",)))
    name = str(dtype).removeprefix("torch.")
    try:
        result = compare(*random_inputs(_head_shape(length), attrs, dtype, device="cuda"), attrs)
    except Exception as exc:
        return ParityRow(length, name, None, None, None, error_text(exc))
    finally:
        torch.cuda.empty_cache()
    return ParityRow(length, name, result.max_abs_err, result.tolerance,
                     result.bucket_mismatches + result.order_mismatches)


def _hf_config(config: ReformerConfig):  # -> transformers.ReformerConfig
    import transformers

    data = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    return transformers.ReformerConfig(**data, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                                       local_attention_probs_dropout_prob=0.0)


def _bench_op(rows: list[Point], length: int, attrs: LSHAttrs) -> None:
    """The attention cores alone, on [1,H,L,D] fp16: our op and dense causal SDPA."""
    qk, v, rotations, mask = random_inputs(_head_shape(length), attrs, torch.float16, padded=False, device="cuda")
    timed(rows, LAYER, length, OURS_OP, lambda: lsh_attention_triton(qk, v, rotations, mask, attrs))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    timed(rows, LAYER, length, DENSE_OP, lambda: sdpa(qk, qk, v, is_causal=True))


def bench_layer(rows: list[Point], length: int) -> None:
    """The op alone, then whole layers (projections + attention) on x [1,L,d_model] fp16."""
    config = _config(length, ("lsh",))
    _bench_op(rows, length, lsh_attrs(config))
    torch.manual_seed(0)
    ours = LSHSelfAttention(config).eval().half().cuda()
    x = torch.randn(1, length, config.hidden_size, device="cuda", dtype=torch.float16)
    mask = torch.ones(1, length, dtype=torch.int32, device="cuda")
    for implementation, name in (("triton", "ours (layer)"), ("reference", "reference (layer)")):
        with forced_kernels(implementation):
            timed(rows, LAYER, length, name, lambda: ours(x, mask))
    try:
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSHSelfAttention

        hf = HFLSHSelfAttention(_hf_config(config)).eval()
        with torch.no_grad():
            hf.query_key.weight.copy_(ours.query_key.weight.float())
            hf.value.weight.copy_(ours.value.weight.float())
        hf = hf.half().cuda()
    except Exception as exc:
        rows.append(Point(LAYER, "HF LSHSelfAttention (layer)", length, error=error_text(exc)))
        return
    timed(rows, LAYER, length, "HF LSHSelfAttention (layer)", lambda: hf(x))


def _bench_ours(rows: list[Point], length: int, directory: str, ids: torch.Tensor,
                profile: bool) -> list[dict] | None:
    """Our ReformerModel from ``directory`` (fp16, Triton kernels); with ``profile``, its per-kernel times."""
    ours = ReformerModel.from_pretrained(directory, max_length=length).half().cuda()
    with forced_kernels("triton"):
        timed(rows, MODEL, length, OURS_MODEL, lambda: ours(ids))
        return profile_forward(lambda: ours(ids)) if profile else None


def bench_model(rows: list[Point], length: int, dense: torch.nn.Module, profile: bool) -> list[dict] | None:
    """Ours, HF (same weights) and the dense baseline at ``length``; with ``profile``, ours per kernel."""
    ids = torch.randint(0, ENWIK8["vocab_size"], (1, length), device="cuda")
    timed(rows, MODEL, length, DENSE_MODEL, lambda: dense(ids))
    try:
        import transformers

        torch.manual_seed(0)
        hf = transformers.ReformerModel(_hf_config(_config(length, ENWIK8["attn_layers"]))).eval()
        with tempfile.TemporaryDirectory() as directory:
            hf.save_pretrained(directory)
            kernel_times = _bench_ours(rows, length, directory, ids, profile)
    except Exception as exc:
        rows.append(Point(MODEL, "setup", length, error=error_text(exc)))
        return None
    torch.cuda.empty_cache()
    hf = hf.half().cuda()
    timed(rows, MODEL, length, HF_MODEL, lambda: hf(input_ids=ids))
    return kernel_times


def profile_forward(fn: Callable[[], object], top: int = 15) -> list[dict]:
    """The ``top`` CUDA kernels of one call of ``fn`` by total device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    return [{"kernel": e.key[:120], "calls": e.count, "ms": e.device_time_total / 1000} for e in events]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench gpu: CUDA is not available; this benchmark needs an NVIDIA GPU with a CUDA build of torch "
              "(the kernels' CPU check is `TRITON_INTERPRET=1 pytest tests/plugins`)", file=sys.stderr)
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    out = Path(args.out)
    try:
        make_out_dir(out)
    except InputError as exc:
        print(f"bench gpu: {exc}", file=sys.stderr)
        return 2
    report: dict = dataclasses.asdict(Provenance.here())

    def save(**sections: object) -> None:
        report.update(sections)
        (out / "bench.json").write_bytes(json_bytes(report))

    parity = [check_parity(length, dtype) for length in args.lengths for dtype in (torch.float32, torch.float16)]
    save(parity=[{**dataclasses.asdict(p), "ok": p.ok} for p in parity])
    rows: list[Point] = []
    for length in args.lengths:
        bench_layer(rows, length)
        save(timings=[r.to_json() for r in rows])
    if not args.skip_model:
        with torch.device("cuda"):
            dense = DenseTransformer(vocab_size=ENWIK8["vocab_size"]).half().eval()
        for length in MODEL_LENGTHS:
            kernel_times = bench_model(rows, length, dense, args.profile and length == MODEL_LENGTHS[-1])
            save(timings=[r.to_json() for r in rows])
            if kernel_times:
                save(profile={"what": f"ours ReformerModel, L={length}, fp16", "kernels": kernel_times})
    targets = benchmark_targets(rows)
    save(targets=[t.to_json() for t in targets])
    errors = [f"parity L={p.length} {p.dtype}: {p.error}" for p in parity if p.error]
    errors += [f"{r.what} L={r.length} {r.impl}: {r.error}" for r in rows if r.error]
    sections = [f"Parity on {report['machine']}, {report['date']}", format_parity(parity),
                format_table(rows, report["machine"], report["date"]), "Targets (fp16, B=1)", format_targets(targets)]
    if "profile" in report:
        sections.append(f"CUDA kernels of {report['profile']['what']} (torch.profiler):\n" + "\n".join(
            f"- {k['ms']:.3f} ms, {k['calls']} calls: {k['kernel']}" for k in report["profile"]["kernels"]))
    if errors:
        sections.append("Errors:\n" + "\n".join(f"- {e}" for e in errors))
    markdown = "\n\n".join(sections)
    (out / "bench.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    return 0 if all(p.ok for p in parity) else 1


if __name__ == "__main__":
    sys.exit(main())
