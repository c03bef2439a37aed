"""``reformer-rt doctor``: what this machine can run, and proof that what is present works.

The report covers Python, torch (CUDA build, GPU name and compute capability), triton, onnxruntime (version, the
distribution that provides it, usable execution providers -- and the package to fix when a GPU has no
CUDAExecutionProvider, or when the CPU wheel ``onnxruntime`` shadows ``onnxruntime-gpu``), TensorRT (version, or
why it is unusable, with the install line for this torch's CUDA) and whether the LSHAttention plugin is
registered.

On a CUDA GPU with triton it then runs the Triton self-test -- the compiled kernels on small cases (hashed and
full attention, factorized buckets, ragged masks) against the fp32 reference on the CPU, in fp32 and in fp16, with
the tolerances of ``reformer_rt.plugins.parity`` -- and a forward pass of a tiny random LM on the GPU (Triton
kernels) against the same model on the CPU (reference op). Each check prints its figure.

The TensorRT self-test then exports a tiny random model in plugin form, builds an engine (no cache, no TF32),
runs it on padded and unpadded batches through ``TensorRTBackend`` and compares it with the PyTorch model on the
CPU (the fp32 reference LSH), within the exporter's float32 tolerance. This is the check to run on a TensorRT
machine before trusting the TensorRT path: the project's own CI has no TensorRT.

Exit code 0 when everything present works (a missing optional component is reported, not failed), 1 otherwise.
Checks that need what this machine lacks say that they did not run and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reformer_rt.models.lsh import OP_ID, LSHAttrs
from reformer_rt.models.presets import random_model

from ..errors import BackendUnavailable
from ..hardware import gpu_info

OK, ABSENT, FAILED = "ok", "absent", "FAILED"
TENSORRT, PLUGIN, SELF_TEST = "tensorrt", "lsh plugin", "tensorrt self-test"
CUDA_FORWARD = "cuda forward"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, ABSENT (optional and missing: not a failure) or FAILED
    detail: str


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("doctor", help="report what this machine can run; self-test TensorRT if present",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--no-self-test", action="store_true", help="only report; skip the TensorRT self-test")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    checks = []
    for name, probe in PROBES:
        checks.append(_guarded(name, probe))
        print(_line(checks[-1]), flush=True)
    trt = next(c for c in checks if c.name == TENSORRT)
    if args.no_self_test:
        final = Check(SELF_TEST, ABSENT, "not run: --no-self-test")
    elif trt.status != OK or not torch.cuda.is_available():
        reason = "no usable TensorRT on this machine (see the tensorrt line)" if trt.status != OK else "no CUDA GPU"
        final = Check(SELF_TEST, ABSENT, f"not run: {reason}")
    else:
        final = _guarded(SELF_TEST, tensorrt_self_test)
    checks.append(final)
    print(_line(final))
    failed = [c.name for c in checks if c.status == FAILED]
    print(f"doctor: {'FAILED: ' + ', '.join(failed) if failed else 'healthy'}")
    return 1 if failed else 0


def _line(check: Check) -> str:
    return f"{check.name:<20} {check.status:<7} {check.detail}"


def _guarded(name: str, probe: Callable[[], Check]) -> Check:
    """Run a probe; an unexpected exception is a failed check, not a crash of the report."""
    try:
        return probe()
    except Exception as exc:  # the report must go on whatever one component does
        return Check(name, FAILED, f"{type(exc).__name__}: {exc}")


def check_python() -> Check:
    return Check("python", OK, f"{platform.python_version()} on {platform.platform()}")


def check_torch() -> Check:
    cuda = torch.version.cuda or "none (CPU build)"
    if not torch.cuda.is_available():
        return Check("torch", OK, f"{torch.__version__}, CUDA {cuda}, no GPU visible")
    gpu = gpu_info()
    return Check("torch", OK, f"{torch.__version__}, CUDA {cuda}, GPU {gpu.name} (compute capability "
                              f"{gpu.compute_capability})")


def check_triton() -> Check:
    try:
        import triton
    except ImportError:
        return Check("triton", ABSENT, "not installed (the LSH kernels need it: pip install triton)")
    import reformer_rt.plugins  # noqa: F401  (ImportError here is a broken install: FAILED)

    where = "compiled for this GPU on first use" if torch.cuda.is_available() else "they run on CUDA tensors"
    return Check("triton", OK, f"{triton.__version__}; the LSH kernels import ({where})")


def _gpu_kernels_missing() -> str | None:
    """Why the GPU self-tests cannot run here, or None."""
    if not torch.cuda.is_available():
        return "not run: no CUDA GPU"
    if importlib.util.find_spec("triton") is None:
        return "not run: triton is not installed"
    return None


#: Small self-test cases: (shape [B,H,L,D], attributes): hashed with 2 and 4 rounds, factorized, the enwik8 head
#: and chunk, and full attention (L <= chunk). Ragged masks throughout.
KERNEL_CASES = (((2, 2, 64, 32), LSHAttrs(2, (4,), 16, 1, 0, True)),
                ((1, 2, 256, 64), LSHAttrs(4, (4, 8), 64, 1, 1, False)),
                ((1, 2, 1024, 128), LSHAttrs(4, (32,), 256, 1, 0, True)),
                ((2, 2, 48, 32), LSHAttrs(2, (4,), 64, 1, 0, True)))


def _kernel_check(name: str, dtype: torch.dtype) -> Check:
    missing = _gpu_kernels_missing()
    if missing:
        return Check(name, ABSENT, missing)
    from reformer_rt.plugins.parity import compare, random_inputs

    results = [compare(*random_inputs(shape, attrs, dtype, device="cuda"), attrs, reference_device="cpu")
               for shape, attrs in KERNEL_CASES]
    worst = max(results, key=lambda r: r.max_abs_err / r.tolerance)
    wrong = sum(r.bucket_mismatches + r.order_mismatches for r in results)
    status = OK if all(r.ok for r in results) else FAILED
    return Check(name, status, f"Triton on the GPU vs the fp32 reference, {len(results)} cases: max abs err "
                               f"{worst.max_abs_err:.2e} (tolerance {worst.tolerance:.2e}); {wrong} bucket/order "
                               "mismatches")


def check_kernels_fp32() -> Check:
    return _kernel_check("kernels fp32", torch.float32)


def check_kernels_fp16() -> Check:
    return _kernel_check("kernels fp16", torch.float16)


def check_cuda_forward() -> Check:
    """The tiny LM on the GPU (Triton kernels) vs the same model on the CPU (reference op), ragged batches."""
    missing = _gpu_kernels_missing()
    if missing:
        return Check(CUDA_FORWARD, ABSENT, missing)
    from reformer_rt.export.validate import FP32_ABS_TOL, random_inputs

    model = random_model()
    on_gpu = random_model().cuda()
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, length, ragged in SELF_TEST_CASES:
        ids, mask = random_inputs(model.config.vocab_size, batch, length, ragged, generator)
        with torch.inference_mode():
            expected = model(ids, mask)
            got = on_gpu(ids.cuda(), mask.cuda()).cpu()
        worst = max(worst, (got - expected)[mask.bool()].abs().max().item())
    status = OK if worst <= FP32_ABS_TOL else FAILED
    return Check(CUDA_FORWARD, status, f"tiny LM, GPU (Triton) vs CPU (reference) on {len(SELF_TEST_CASES)} "
                                       f"batches: max abs diff {worst:.2e} on logits (tolerance {FP32_ABS_TOL:g})")


#: The ONNX Runtime wheels that install the module ``onnxruntime``: installed together, the last one wins per file.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
ORT_GPU_REPAIR = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"


def _installed(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def check_onnxruntime() -> Check:
    installed = _installed(ORT_DISTRIBUTIONS)
    if len(installed) > 1:
        return Check("onnxruntime", FAILED, "both onnxruntime and onnxruntime-gpu are installed: they install the "
                                            "same module, so the CPU wheel shadows the GPU one; repair: "
                                            f"{ORT_GPU_REPAIR}")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check("onnxruntime", ABSENT, f"cannot import ({exc}); the ONNX Runtime backend and export "
                                            'validation need it: pip install "reformer-rt[cpu]" (CPU) or '
                                            '"reformer-rt[cuda]" (GPU)')
    providers = ort.get_available_providers()
    detail = f"{ort.__version__} ({installed[0] if installed else 'unknown distribution'}), usable providers: " \
             f"{', '.join(providers)}"
    if not torch.cuda.is_available() or "CUDAExecutionProvider" in providers:
        return Check("onnxruntime", OK, detail)
    if "onnxruntime-gpu" in installed:
        return Check("onnxruntime", FAILED, f"{detail}; onnxruntime-gpu is installed but offers no "
                                            "CUDAExecutionProvider: reinstall the build for this CUDA: "
                                            f"{ORT_GPU_REPAIR}")
    return Check("onnxruntime", OK, f"{detail}; no CUDAExecutionProvider, so ONNX files run on the CPU here -- for "
                                    f"this GPU: {ORT_GPU_REPAIR}")


def check_tensorrt() -> Check:
    from ..engine_builder import import_tensorrt

    try:
        trt = import_tensorrt()
    except BackendUnavailable as exc:
        return Check(TENSORRT, ABSENT, f"{exc}{_matching_wheel()}")
    return Check(TENSORRT, OK, trt.__version__)


def _matching_wheel() -> str:
    major = (torch.version.cuda or "").split(".")[0]
    return f" (this torch is built for CUDA {major}: tensorrt-cu{major})" if major in ("12", "13") else ""


def check_plugin() -> Check:
    from ..tensorrt_backend import plugin_registered

    if plugin_registered():
        return Check(PLUGIN, OK, f"{OP_ID} is registered with TensorRT")
    return Check(PLUGIN, ABSENT, "not registered (needs tensorrt, a CUDA GPU and triton)")


def tensorrt_self_test() -> Check:
    """Export a tiny plugin-form model, build an engine, run it, compare with the PyTorch model on the CPU."""
    from reformer_rt.export import export_onnx
    from reformer_rt.export.validate import FP32_ABS_TOL, random_inputs

    from ..engine_builder import BuildOptions, engine_for
    from ..engine_profiles import make_profile, parse_batch_length
    from ..tensorrt_backend import TensorRTBackend

    model = random_model()
    with tempfile.TemporaryDirectory(prefix="reformer_rt_doctor_") as tmp:
        onnx_path = Path(tmp) / "doctor.onnx"
        export_onnx(model, onnx_path, attention="plugin", validate=False, log=None)
        profile = make_profile(parse_batch_length("1x1", "min"), parse_batch_length("3x40", "opt"),
                               parse_batch_length("3x64", "max"), model.config.max_position_embeddings)
        built = engine_for(onnx_path, BuildOptions(profile, tf32=False), cache=None, log=lambda _: None)
    backend = TensorRTBackend(built.engine, built.record, "cuda")
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, length, ragged in SELF_TEST_CASES:
        ids, mask = random_inputs(model.config.vocab_size, batch, length, ragged, generator)
        with torch.no_grad():
            expected = model(ids, mask).numpy()
        got = backend.run(ids.numpy(), mask.numpy())["logits"]
        worst = max(worst, float(np.abs(got - expected)[mask.numpy() != 0].max()))
    status = OK if worst <= FP32_ABS_TOL else FAILED
    return Check(SELF_TEST, status, f"engine vs PyTorch on {len(SELF_TEST_CASES)} batches: max abs diff "
                                               f"{worst:.2e} (tolerance {FP32_ABS_TOL:g}; {len(built.engine)} bytes)")


#: (batch, length, ragged): short path, hashed path at chunk multiples and not, padded rows, the profile's edges.
SELF_TEST_CASES = ((1, 1, False), (2, 5, False), (3, 40, True), (1, 27, False), (2, 64, True), (3, 64, False))


PROBES = (("python", check_python), ("torch", check_torch), ("triton", check_triton),
          ("kernels fp32", check_kernels_fp32), ("kernels fp16", check_kernels_fp16),
          (CUDA_FORWARD, check_cuda_forward), ("onnxruntime", check_onnxruntime), (TENSORRT, check_tensorrt),
          (PLUGIN, check_plugin))
