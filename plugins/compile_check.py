"""Compile every LSH kernel specialization for real GPUs, on a machine without one.

``python -m reformer_rt.plugins.compile_check [--arch 80 90] [--jobs N] [--json PATH]``

Each launch that ``lsh_triton.specializations()`` enumerates (the launchers' own tuning policy evaluated over
every input they accept) is specialized exactly as Triton's JIT would specialize it at launch (its own binder:
argument types, constexprs, divisibility attributes, options) and compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` down to a cubin by the ptxas bundled with triton. A specialization fails on a
compile error or when its shared memory exceeds the per-block limit of the architecture. Only launching needs a
GPU, so a compile error or an over-sized tile never first shows up on one.

Needs the real compiler: run it with ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` builds
interpreted functions, which cannot be compiled; the check then exits 2). Uses Triton's kernel cache
(``TRITON_CACHE_DIR``); point it at an empty directory to time the compiles themselves.

Measured on 2 CPU cores: 88 specializations x 2 archs in about 2 minutes of wall time (triton 3.9 and 3.6, empty
cache); the largest shared memory is the fp16 attend tile at D = 128 (113 KB on sm_90) and the hash kernel's
1024-column rotation tile (130 KB).

Known limits: it reaches into two Triton internals to reuse the JIT's binder (``create_function_from_signature``
and ``JITFunction._pack_args``; checked with triton 3.6 and 3.9); another Triton version may need this module
updated, and says so. Exit status: 0 all compiled within limits, 1 a failure, 2 cannot run here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: Largest shared memory one block may use (opt-in), per compute capability: sm_80 (A100) 163 KB, sm_90
#: (H100/H200) 227 KB -- CUDA C++ Programming Guide, "Technical Specifications per Compute Capability".
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}
INTERPRET_ENV = "TRITON_INTERPRET"


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    arch: int
    seconds: float
    shared_bytes: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared_bytes is not None and \
            self.shared_bytes <= SHARED_LIMIT_BYTES[self.arch]


def compile_launch(launch, arch: int):  # (KernelLaunch, int) -> triton CompiledKernel
    """Compile one launch for ``sm_<arch>`` as the JIT would compile it on that GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature") or not hasattr(launch.kernel, "_pack_args"):
        raise RuntimeError(f"compile_check: triton {triton.__version__} has no create_function_from_signature / "
                           "JITFunction._pack_args, which it reuses (checked with triton 3.6 and 3.9); update "
                           "compile_launch for this version")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = jit.create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.meta, bound, specialization,
                                                                     options)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


_LAUNCHES: dict = {}  # name -> KernelLaunch, filled before the worker processes fork


def _compile_one(name: str, arch: int) -> Result:
    started = time.perf_counter()
    try:
        kernel = compile_launch(_LAUNCHES[name], arch)
    except Exception as exc:  # every failure is reported with its specialization, then the run goes on
        return Result(name, arch, time.perf_counter() - started, None, f"{type(exc).__name__}: {exc}"[-2000:])
    return Result(name, arch, time.perf_counter() - started, int(kernel.metadata.shared), None)


def run(archs: Sequence[int], jobs: int) -> list[Result]:
    """Compile every specialization for every arch in ``jobs`` forked processes (compiles are CPU-bound)."""
    from .lsh_triton import specializations

    _LAUNCHES.update(specializations())
    tasks = [(name, arch) for name in _LAUNCHES for arch in archs]
    if jobs <= 1:
        return [_compile_one(*task) for task in tasks]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, *zip(*tasks)))


def report(results: Sequence[Result]) -> str:
    """Failures first, then the largest shared memory per kernel and arch, then the totals."""
    lines = [f"FAILED sm_{r.arch} {r.name}: " + (r.error or f"shared memory {r.shared_bytes:,} B over the "
             f"sm_{r.arch} limit {SHARED_LIMIT_BYTES[r.arch]:,} B") for r in results if not r.ok]
    for kernel in sorted({r.name.split()[0] for r in results}):
        for arch in sorted({r.arch for r in results}):
            sized = [r for r in results if r.name.split()[0] == kernel and r.arch == arch and r.shared_bytes]
            if sized:
                top = max(sized, key=lambda r: r.shared_bytes or 0)
                lines.append(f"largest shared memory, {kernel} on sm_{arch}: {top.shared_bytes / 1024:.1f} KB "
                             f"({top.name}; limit {SHARED_LIMIT_BYTES[arch] / 1024:.0f} KB)")
    failed = sum(not r.ok for r in results)
    lines.append(f"compile_check: {len(results) - failed} of {len(results)} compiles passed "
                 f"({len({r.name for r in results})} specializations x {len({r.arch for r in results})} archs; "
                 f"{sum(r.seconds for r in results):.0f} s of compile time)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reformer_rt.plugins.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(SHARED_LIMIT_BYTES),
                        choices=sorted(SHARED_LIMIT_BYTES), help="compute capabilities x 10 (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args(argv)
    if os.environ.get(INTERPRET_ENV, "0") not in ("", "0"):
        print(f"compile_check: {INTERPRET_ENV} is set, so triton builds interpreted kernels that cannot be "
              f"compiled; run it with {INTERPRET_ENV} unset", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run(args.arch, args.jobs)
    if args.json:
        args.json.write_text(json.dumps({"wall_seconds": time.perf_counter() - started, "limits": SHARED_LIMIT_BYTES,
                                         "results": [{**dataclasses.asdict(r), "ok": r.ok} for r in results]},
                                        indent=1) + "\n", encoding="utf-8")
    print(report(results) + f" in {time.perf_counter() - started:.0f} s wall")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
