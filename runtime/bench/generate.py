"""``reformer-rt bench generate``: per-token latency of generation vs prompt length, ours cached vs transformers
cached vs ours without a cache.

    reformer-rt bench generate                                    # both models, prompts of 1K / 16K / 64K tokens
    reformer-rt bench generate --lengths 1024,4096 --steps 8 --models demo

For each model (``--models``: ``crime-and-punishment`` -- the architecture of ``reformer-rt bench`` with random
weights --, ``demo`` -- the bundled model --, or a checkpoint directory), prompt length and variant, one fresh
worker process (its own peak memory, no warm caches) loads the model, warms up on a short prompt, then:

* ``cached``: our prefill of the prompt, then ``--steps`` greedy cached steps (``models/decoding.py``);
* ``hf``: transformers' ``ReformerModelWithLMHead`` on the same weights, the same way (``use_cache=True``,
  ``past_buckets_states``: what its ``generate`` calls), when transformers is installed;
* ``recompute``: our forward over the whole sequence for each new token, ``--recompute-steps`` times.

Per-token time is the median over the steps after two warm-up steps (recompute: over every step). The report gives
each point, ours / transformers per token, and per variant the slope of per-token time against prompt length (a
least-squares fit, ms per 1K prompt tokens) with the ratio of the longest to the shortest prompt's time. Writes
``generate.json`` into ``--out`` (atomically) and prints a markdown table with the machine; exits 1 when a point
failed (2 when every failure is a user error; each is recorded). Timings are of the machine as it is: run it alone.
Each row of ``generate.json`` is a point of the benchmarks' harness (``harness.Point``): ``what`` the model,
``impl`` the variant, ``seconds`` the median per-token time, ``details`` the prefill time and the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reformer_rt.models import InputError, ReformerConfig, ReformerLM
from reformer_rt.models.checkpoint import CONFIG_FILE
from reformer_rt.models.decoding import DecodeCache, prefill, step
from reformer_rt.models.presets import CRIME_AND_PUNISHMENT, demo_model_dir

from ..artifacts import write_files_atomic
from .harness import (
    Point, Provenance, answer_worker, check_failures, has_transformers, json_bytes, make_out_dir, markdown_table,
    measure_in_workers, parse_ints, peak_memory,
)

COMMAND = "bench generate"
VARIANTS = ("cached", "hf", "recompute")
NAMED_MODELS = ("crime-and-punishment", "demo")
WARMUP_STEPS = 2
WARMUP_PROMPT = 128


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="per-token generation latency vs prompt length, with transformers",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default=",".join(NAMED_MODELS),
                   help="comma-separated: crime-and-punishment, demo, or checkpoint directories")
    p.add_argument("--lengths", default="1024,16384,65536", help="comma-separated prompt lengths")
    p.add_argument("--steps", type=int, default=16, help="timed cached steps per point (default 16)")
    p.add_argument("--recompute-steps", type=int, default=2, help="timed tokens of the recompute variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: cached, hf, recompute")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of every worker (default: all)")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--quiet", action="store_true", help="no line per point on stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """One point: ``variant`` decoding after a random prompt of ``length`` tokens."""

    model: str  # the name the report gives it
    checkpoint: str
    length: int
    variant: str  # one of VARIANTS
    steps: int
    recompute_steps: int
    threads: int

    def pending(self) -> Point:
        return Point(self.model, self.variant, self.length)


# ----------------------------------------------------------------------------------------------------- worker
def _worker(spec: DecodeSpec) -> Point:
    """One point in this (fresh) process."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    config = ReformerConfig.from_json_file(Path(spec.checkpoint) / CONFIG_FILE)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, spec.length), generator=generator)
    warmup = prompt[:, :WARMUP_PROMPT]
    timing = {"cached": _time_cached, "hf": _time_hf, "recompute": _time_recompute}[spec.variant]
    prefill_s, step_s = timing(spec, prompt, warmup)
    peak, memory = peak_memory(cuda=False)  # every variant runs on the CPU
    return dataclasses.replace(spec.pending(), seconds=statistics.median(step_s), peak_bytes=peak, memory=memory,
                               details={"prefill_s": prefill_s, "steps": len(step_s)})


def _steps(count: int, run_step: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return times


def _time_cached(spec: DecodeSpec, prompt: torch.Tensor, warmup: torch.Tensor) -> tuple[float, list[float]]:
    model = ReformerLM.from_pretrained(spec.checkpoint)
    total = WARMUP_STEPS + spec.steps
    with torch.inference_mode():
        for ids in (warmup, prompt):
            cache = DecodeCache.empty(model, 1, ids.shape[1] + total + 1, ids.shape[1])
            start = time.perf_counter()
            token = [prefill(model, cache, [0], ids).argmax(-1)]
            prefill_s = time.perf_counter() - start

            def one() -> None:
                token[0] = step(model, cache, token[0]).argmax(-1)

            times = _steps(total, one)
    return prefill_s, times[WARMUP_STEPS:]


def _time_hf(spec: DecodeSpec, prompt: torch.Tensor, warmup: torch.Tensor) -> tuple[float, list[float]]:
    import transformers

    model = transformers.ReformerModelWithLMHead.from_pretrained(spec.checkpoint).eval()
    total = WARMUP_STEPS + spec.steps
    with torch.no_grad():
        for ids in (warmup, prompt):
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill_s = time.perf_counter() - start
            state = [out.past_buckets_states, out.logits[:, -1:].argmax(-1)]

            def one() -> None:
                result = model(state[1], past_buckets_states=state[0], use_cache=True)
                state[:] = [result.past_buckets_states, result.logits[:, -1:].argmax(-1)]

            times = _steps(total, one)
    return prefill_s, times[WARMUP_STEPS:]


def _time_recompute(spec: DecodeSpec, prompt: torch.Tensor, warmup: torch.Tensor) -> tuple[float, list[float]]:
    model = ReformerLM.from_pretrained(spec.checkpoint)
    with torch.inference_mode():
        model(warmup)
        sequence = [prompt]

        def one() -> None:
            token = model(sequence[0])[:, -1].argmax(-1, keepdim=True)
            sequence[0] = torch.cat([sequence[0], token], dim=1)

        times = _steps(spec.recompute_steps, one)
    return times[0], times


# ------------------------------------------------------------------------------------------------------ report
def slopes(points: list[Point]) -> dict[str, dict[str, float]]:
    """Per (model, variant): least-squares slope of per-token ms vs prompt length (ms per 1K tokens), and the
    ratio of the longest prompt's per-token time to the shortest's (linear growth gives the length ratio)."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({(p.what, p.impl) for p in points}):
        series = sorted((p.length, p.ms) for p in points if (p.what, p.impl) == key and p.ms is not None)
        if len(series) < 2:
            continue
        xs, ys = [x / 1e3 for x, _ in series], [y for _, y in series]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        out[f"{key[0]} {key[1]}"] = {"ms_per_1k_prompt_tokens": slope, "longest_over_shortest": ys[-1] / ys[0],
                                     "length_ratio": series[-1][0] / series[0][0]}
    return out


def _cell(point: Point | None) -> str:
    if point is None:
        return "-"
    return f"failed: {point.error}" if point.ms is None else f"{point.ms:.1f}"


def table(points: list[Point]) -> str:
    """One line per (model, prompt length): per-token ms of each variant and ours / transformers."""
    found = {(p.what, p.length, p.impl): p for p in points}
    rows = []
    for model, length in dict.fromkeys((p.what, p.length) for p in points):
        ours, hf = found.get((model, length, "cached")), found.get((model, length, "hf"))
        ratio = f"{ours.ms / hf.ms:.2f}x" if ours and hf and ours.ms is not None and hf.ms else "-"
        prefill = " / ".join(f"{p.details['prefill_s']:.2f}" if p and "prefill_s" in p.details else "-"
                             for p in (ours, hf))
        rows.append((model, f"{length:,}", *(_cell(found.get((model, length, v))) for v in VARIANTS), ratio, prefill))
    return markdown_table(("model", "prompt", "ours cached (ms/token)", "transformers cached", "ours recompute",
                           "ours / transformers", "prefill ours / transformers (s)"), rows)


def _models(text: str, tmp: Path) -> dict[str, Path]:
    """Model name -> checkpoint directory (the crime-and-punishment one is written with random weights)."""
    out = {}
    for name in (m.strip() for m in text.split(",") if m.strip()):
        if name == "crime-and-punishment":
            torch.manual_seed(0)
            out[name] = tmp / "crime-and-punishment"
            ReformerLM(CRIME_AND_PUNISHMENT).save_pretrained(out[name])
        elif name == "demo":
            out[name] = demo_model_dir()
        elif Path(name).is_dir():
            out[name] = Path(name)
        else:
            raise InputError(f"--models: got {name!r}; expected {' or '.join(NAMED_MODELS)} or a checkpoint directory")
    if not out:
        raise InputError("--models: got none; expected at least one model")
    return out


def _check_arguments(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    lengths = parse_ints(args.lengths, "--lengths")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        raise InputError(f"--variants: got {args.variants!r}; expected some of {', '.join(VARIANTS)}")
    if args.steps < 1 or args.recompute_steps < 1 or args.threads < 0:
        raise InputError(f"--steps / --recompute-steps / --threads: got {args.steps} / {args.recompute_steps} / "
                         f"{args.threads}; expected >= 1 / >= 1 / >= 0 (0 = all cores)")
    make_out_dir(args.out)
    return lengths, variants


def _check_lengths(models: dict[str, Path], lengths: list[int], steps: int) -> None:
    for name, path in models.items():
        config = ReformerConfig.from_json_file(path / CONFIG_FILE)
        limit = config.max_input_length - WARMUP_STEPS - steps - 1
        if max(lengths) > limit:
            raise InputError(f"--lengths: got {max(lengths):,} for {name}; expected at most {limit:,} (its "
                             "maximum input length, less the tokens generated)")


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return answer_worker(args.worker, DecodeSpec, _worker)
    lengths, variants = _check_arguments(args)
    if "hf" in variants and not has_transformers():
        variants.remove("hf")
        print(f"reformer-rt {COMMAND}: transformers is not installed; no hf variant", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="reformer-rt-bench-generate-") as tmp:
        models = _models(args.models, Path(tmp))
        _check_lengths(models, lengths, max(args.steps, args.recompute_steps))
        specs = [DecodeSpec(name, str(path), length, variant, args.steps, args.recompute_steps, args.threads)
                 for name, path in models.items() for length in lengths for variant in variants]
        points = measure_in_workers(COMMAND, specs, args.quiet)
    provenance, fits = Provenance.here(), slopes(points)
    report = {**dataclasses.asdict(provenance), "threads": args.threads, "rows": [p.to_json() for p in points],
              "slopes": fits}
    write_files_atomic({args.out / "generate.json": json_bytes(report)}, label="--out")
    print(f"machine: {provenance.machine}, {provenance.date}\n\n{table(points)}\n")
    for key, fit in fits.items():
        print(f"{key}: {fit['ms_per_1k_prompt_tokens']:+.3f} ms per 1K prompt tokens; longest/shortest "
              f"{fit['longest_over_shortest']:.2f}x for {fit['length_ratio']:.0f}x the prompt")
    print(f"wrote {args.out / 'generate.json'}")
    return check_failures(points, args.out / "generate.json", COMMAND)
