"""GPU check and benchmark of the Triton LSH kernels: ``python -m reformer_rt.plugins.bench_gpu --out DIR``.

One run, on one CUDA GPU, everything in the same process so every figure shares the device:

1. Parity: ``lsh_attention_triton`` against ``lsh_attention_reference`` on the enwik8 LSH layer shape (B=1,
   8 heads x 128, 4 hashes, chunk 256, 1 chunk before, 0 after, causal, ragged mask) at each length, fp32 and
   fp16, with the criteria of ``tests/plugins``: fp32 max abs error <= 1e-5; fp16 <= 4 * 2^-11 * max|v| against
   the reference on the same fp16 inputs. Bucket ids are compared too (mismatch count).
2. LSH layer timings (d_model 1024, fp16) at each length: the op alone (ours vs dense causal SDPA) and the whole
   layer with projections (our ``LSHSelfAttention`` with the Triton kernels, the same module with the reference,
   transformers' ``LSHSelfAttention`` with the same weights).
3. 12-layer enwik8-like model forward, fp16, at 16K and 64K: our ``ReformerModel`` vs transformers'
   ``ReformerModel`` with the same weights.

Times are medians of CUDA-event-timed runs after a warm-up run (which also compiles); memory is the peak of
``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (inputs and weights
excluded). Writes ``bench.json`` and ``bench.md`` to DIR and prints the tables with the GPU name and date.

Known limits: transformers draws its hash rotations from the CUDA generator inside ``forward``, so its outputs
differ from ours on GPU and are timed, not compared (HF parity is checked on CPU in ``tests/models``). A failing
measurement is recorded as n/a with its error and the run goes on. Exit status: 0 parity passed, 1 a parity
check failed, 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from reformer_rt.models import LSHAttrs, ReformerConfig, ReformerModel, lsh_attention_reference, make_rotations
from reformer_rt.models.attention import LSHSelfAttention, lsh_attrs
from reformer_rt.models.lsh import lsh_hash
from reformer_rt.models.lsh_op import KERNELS_ENV

from .lsh_triton import lsh_attention_triton, lsh_hash_triton

DEFAULT_LENGTHS = (4096, 16384, 65536)
MODEL_LENGTHS = (16384, 65536)
FP32_TOL = 1e-5
FP16_UNIT_ROUNDOFF = 2.0**-11
#: enwik8 (google/reformer-enwik8) hyper-parameters; num_buckets is resolved per length as HF would.
ENWIK8 = dict(
    vocab_size=258, hidden_size=1024, num_attention_heads=8, attention_head_size=128, feed_forward_size=4096,
    attn_layers=("local", "lsh") * 6, is_decoder=True, num_hashes=4, lsh_attn_chunk_length=256,
    lsh_num_chunks_before=1, lsh_num_chunks_after=0, local_attn_chunk_length=128, local_num_chunks_before=1,
    local_num_chunks_after=0, axial_pos_shape=(128, 512), axial_pos_embds_dim=(256, 768),
    max_position_embeddings=65536, hash_seed=0,
)


@dataclasses.dataclass(frozen=True)
class Timing:
    what: str
    length: int
    impl: str
    ms: float | None
    peak_gb: float | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Parity:
    length: int
    dtype: str
    max_abs_err: float
    tolerance: float
    bucket_mismatches: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_abs_err <= self.tolerance and self.bucket_mismatches == 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reformer_rt.plugins.bench_gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for bench.json and bench.md")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help="sequence lengths of the parity checks and layer timings (multiples of 256)")
    parser.add_argument("--skip-model", action="store_true", help="skip the 12-layer model timings")
    return parser.parse_args(argv)


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[Timing], device: str, date: str) -> str:
    """Markdown: a title line naming the device and date, then one row per measurement."""
    lines = [f"LSH attention benchmark on {device}, {date} (fp16; ms = median, GB = peak extra memory)", "",
             "| what | L | impl | ms | peak extra GB |", "|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.length} | {r.impl} | {_cell(r.ms, 3)} | {_cell(r.peak_gb, 3)} |" for r in rows]
    return "\n".join(lines)


def format_parity(rows: Sequence[Parity]) -> str:
    lines = ["| L | dtype | max abs err | tolerance | bucket mismatches | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {p.length} | {p.dtype} | {p.max_abs_err:.3g} | {p.tolerance:.3g} | {p.bucket_mismatches} | "
              f"{'yes' if p.ok else 'NO'} |" for p in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def _kernels(name: str) -> Iterator[None]:
    previous = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = previous


def _measure(fn: Callable[[], object], target_ms: float = 300.0) -> tuple[float, float]:
    """(median ms, peak extra GB) of ``fn`` after one warm-up call; 3 to 20 timed runs."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    peak_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
    reps = min(20, max(3, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak_gb


def _timed(rows: list[Timing], what: str, length: int, impl: str, fn: Callable[[], object]) -> None:
    try:
        with torch.inference_mode():
            ms, peak = _measure(fn)
        rows.append(Timing(what, length, impl, ms, peak))
    except Exception as exc:  # one failed measurement must not lose the others
        rows.append(Timing(what, length, impl, None, None, f"{type(exc).__name__}: {exc}"[:300]))
    torch.cuda.empty_cache()


def _config(length: int, layers: tuple[str, ...]) -> ReformerConfig:
    return ReformerConfig(**{**ENWIK8, "attn_layers": layers}).resolved(length)


def _op_inputs(length: int, dtype: torch.dtype, attrs: LSHAttrs, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """qk, v [1,H,L,D] of the enwik8 head shape, rotations, and a mask with a padded tail."""
    heads, dim = ENWIK8["num_attention_heads"], ENWIK8["attention_head_size"]
    generator = torch.Generator(device="cuda").manual_seed(seed)
    qk = torch.randn((1, heads, length, dim), device="cuda", generator=generator).to(dtype)
    v = torch.randn((1, heads, length, dim), device="cuda", generator=generator).to(dtype)
    mask = torch.ones(1, length, dtype=torch.int32, device="cuda")
    mask[:, length - length // 7:] = 0  # the padding bucket in every round
    return qk, v, make_rotations(0, heads, dim, attrs).cuda(), mask


def check_parity(length: int, dtype: torch.dtype) -> Parity:
    attrs = lsh_attrs(_config(length, ("lsh",)))
    name = str(dtype).removeprefix("torch.")
    try:
        qk, v, rotations, mask = _op_inputs(length, dtype, attrs)
        with torch.inference_mode():
            out = lsh_attention_triton(qk, v, rotations, mask, attrs).float()
            ref = lsh_attention_reference(qk, v, rotations, mask, attrs).float()
            buckets = lsh_hash_triton(qk, rotations, mask, attrs).long()
            mismatches = int((buckets != lsh_hash(qk, rotations, mask, attrs)).sum())
    except Exception as exc:
        return Parity(length, name, math.inf, 0.0, -1, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        torch.cuda.empty_cache()
    tolerance = FP32_TOL if dtype == torch.float32 else 4 * FP16_UNIT_ROUNDOFF * v.float().abs().max().item()
    return Parity(length, name, (out - ref).abs().max().item(), tolerance, mismatches)


def _hf_config(config: ReformerConfig):  # -> transformers.ReformerConfig
    import transformers

    data = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    return transformers.ReformerConfig(**data, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                                       local_attention_probs_dropout_prob=0.0)


def _bench_ops(rows: list[Timing], length: int, attrs: LSHAttrs) -> None:
    """The attention cores alone, on [1,H,L,D] fp16: our op and dense causal SDPA."""
    qk, v, rotations, mask = _op_inputs(length, torch.float16, attrs)
    mask.fill_(1)
    _timed(rows, "LSH layer", length, "ours (op)", lambda: lsh_attention_triton(qk, v, rotations, mask, attrs))
    q, k = torch.randn_like(qk), torch.randn_like(qk)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    _timed(rows, "LSH layer", length, "dense causal SDPA (op)", lambda: sdpa(q, k, v, is_causal=True))


def bench_layer(rows: list[Timing], length: int) -> None:
    """The op alone, then whole layers (projections + attention) on x [1,L,d_model] fp16."""
    config = _config(length, ("lsh",))
    _bench_ops(rows, length, lsh_attrs(config))
    what = "LSH layer"
    torch.manual_seed(0)
    ours = LSHSelfAttention(config).eval().half().cuda()
    x = torch.randn(1, length, config.hidden_size, device="cuda", dtype=torch.float16)
    mask = torch.ones(1, length, dtype=torch.int32, device="cuda")
    for kernels, name in (("triton", "ours (layer)"), ("reference", "reference (layer)")):
        with _kernels(kernels):
            _timed(rows, what, length, name, lambda: ours(x, mask))
    try:
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSHSelfAttention

        hf = HFLSHSelfAttention(_hf_config(config)).eval()
        with torch.no_grad():
            hf.query_key.weight.copy_(ours.query_key.weight.float())
            hf.value.weight.copy_(ours.value.weight.float())
        hf = hf.half().cuda()
    except Exception as exc:
        rows.append(Timing(what, length, "HF LSHSelfAttention (layer)", None, None, f"{type(exc).__name__}: {exc}"))
        return
    _timed(rows, what, length, "HF LSHSelfAttention (layer)", lambda: hf(x))


def bench_model(rows: list[Timing], length: int) -> None:
    what = "12-layer model"
    try:
        import transformers

        config = _config(length, ENWIK8["attn_layers"])
        torch.manual_seed(0)
        hf = transformers.ReformerModel(_hf_config(config)).eval()
        with tempfile.TemporaryDirectory() as directory:
            hf.save_pretrained(directory)
            ours = ReformerModel.from_pretrained(directory, max_length=length).half().cuda()
        hf = hf.half().cuda()
    except Exception as exc:
        rows.append(Timing(what, length, "setup", None, None, f"{type(exc).__name__}: {exc}"[:300]))
        return
    ids = torch.randint(0, config.vocab_size, (1, length), device="cuda")
    with _kernels("triton"):
        _timed(rows, what, length, "ours ReformerModel", lambda: ours(ids))
    _timed(rows, what, length, "HF ReformerModel", lambda: hf(input_ids=ids))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available; this benchmark needs an NVIDIA GPU with a CUDA build of torch "
              "(the kernels' CPU check is `TRITON_INTERPRET=1 pytest tests/plugins`)", file=sys.stderr)
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parity = [check_parity(length, dtype) for length in args.lengths for dtype in (torch.float32, torch.float16)]
    torch.cuda.empty_cache()
    rows: list[Timing] = []
    for length in args.lengths:
        bench_layer(rows, length)
    if not args.skip_model:
        for length in MODEL_LENGTHS:
            bench_model(rows, length)
            torch.cuda.empty_cache()

    import triton

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    with contextlib.suppress(ImportError):
        import transformers

        versions["transformers"] = transformers.__version__
    errors = [f"parity L={p.length} {p.dtype}: {p.error}" for p in parity if p.error]
    errors += [f"{r.what} L={r.length} {r.impl}: {r.error}" for r in rows if r.error]
    markdown = "\n\n".join([f"Parity on {device}, {date}", format_parity(parity), format_table(rows, device, date)]
                           + (["Errors:\n" + "\n".join(f"- {e}" for e in errors)] if errors else []))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "date": date, "versions": versions,
              "parity": [{**dataclasses.asdict(p), "ok": p.ok} for p in parity],
              "timings": [dataclasses.asdict(r) for r in rows]}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    return 0 if all(p.ok for p in parity) else 1


if __name__ == "__main__":
    sys.exit(main())
