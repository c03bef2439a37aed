"""``reformer-rt doctor``: what this machine can run, and -- where TensorRT and a GPU exist -- proof that it works.

The report covers Python, torch (CUDA build, GPU name and compute capability), triton (and whether the LSH kernels
load; on a GPU they run on a small case and are compared with the fp32 reference), onnxruntime (version and
execution providers), TensorRT (version, or why it is unusable, with the install line for this torch's CUDA) and
whether the LSHAttention plugin is registered.

The TensorRT self-test then exports a tiny random model in plugin form, builds an engine (no cache, no TF32),
runs it on padded and unpadded batches through ``TensorRTBackend`` and compares it with the PyTorch model on the
CPU (the fp32 reference LSH), within the exporter's float32 tolerance. This is the check to run on a TensorRT
machine before trusting the TensorRT path: the project's own CI has no TensorRT.

Exit code 0 when nothing failed (a missing optional component is reported, not failed), 1 otherwise. Without
TensorRT the report says that the self-test did not run and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reformer_rt.models import ReformerConfig, ReformerLM
from reformer_rt.models.lsh import OP_ID

from .errors import BackendUnavailable

OK, ABSENT, FAILED = "ok", "absent", "FAILED"
TENSORRT, PLUGIN, SELF_TEST = "tensorrt", "lsh plugin", "tensorrt self-test"


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
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return Check("torch", OK, f"{torch.__version__}, CUDA {cuda}, GPU {torch.cuda.get_device_name(index)} "
                              f"(compute capability {major}.{minor})")


def check_triton() -> Check:
    try:
        import triton
    except ImportError:
        return Check("triton", ABSENT, "not installed (the LSH kernels need it: pip install triton)")
    from reformer_rt.plugins import lsh_attention_triton  # ImportError here is a broken install: FAILED

    if not torch.cuda.is_available():
        return Check("triton", OK, f"{triton.__version__}; kernels import (they run on CUDA tensors)")
    diff = _kernel_difference(lsh_attention_triton)
    status = OK if diff <= 1e-4 else FAILED
    return Check("triton", status, f"{triton.__version__}; kernels on the GPU vs fp32 reference: max abs diff "
                                   f"{diff:.2e} (tolerance 1e-4)")


def _kernel_difference(kernel: Callable[..., torch.Tensor]) -> float:
    from reformer_rt.models.lsh import LSHAttrs, lsh_attention_reference, make_rotations

    attrs = LSHAttrs(num_hashes=2, bucket_factors=(4,), chunk_length=16, chunks_before=1, causal=True)
    generator = torch.Generator().manual_seed(0)
    qk, v = (torch.randn(2, 2, 64, 32, generator=generator) for _ in range(2))
    mask = torch.ones(2, 64, dtype=torch.int32)
    mask[1, 40:] = 0
    rotations = make_rotations(0, 2, 32, attrs)
    expected = lsh_attention_reference(qk, v, rotations, mask, attrs)
    got = kernel(*(t.cuda() for t in (qk, v, rotations, mask)), attrs).cpu()
    return float((got - expected)[mask.bool()[:, None, :, None].expand_as(got)].abs().max())


def check_onnxruntime() -> Check:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check("onnxruntime", FAILED, f"cannot import ({exc}); pip install onnxruntime")
    return Check("onnxruntime", OK, f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}")


def check_tensorrt() -> Check:
    from .engine_builder import import_tensorrt

    try:
        trt = import_tensorrt()
    except BackendUnavailable as exc:
        return Check(TENSORRT, ABSENT, f"{exc}{_matching_wheel()}")
    return Check(TENSORRT, OK, trt.__version__)


def _matching_wheel() -> str:
    major = (torch.version.cuda or "").split(".")[0]
    return f" (this torch is built for CUDA {major}: tensorrt-cu{major})" if major in ("12", "13") else ""


def check_plugin() -> Check:
    from .tensorrt_backend import plugin_registered

    if plugin_registered():
        return Check(PLUGIN, OK, f"{OP_ID} is registered with TensorRT")
    return Check(PLUGIN, ABSENT, "not registered (needs tensorrt, a CUDA GPU and triton)")


def tensorrt_self_test() -> Check:
    """Export a tiny plugin-form model, build an engine, run it, compare with the PyTorch model on the CPU."""
    from reformer_rt.export import export_onnx
    from reformer_rt.export.validate import FP32_ABS_TOL, random_inputs

    from .engine_builder import BuildOptions, engine_for
    from .engine_profiles import make_profile, parse_batch_length
    from .tensorrt_backend import TensorRTBackend

    model = tiny_model()
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
        got = backend.run(ids.numpy(), mask.numpy())[backend.output_name]
        worst = max(worst, float(np.abs(got - expected)[mask.numpy() != 0].max()))
    status = OK if worst <= FP32_ABS_TOL else FAILED
    return Check(SELF_TEST, status, f"engine vs PyTorch on {len(SELF_TEST_CASES)} batches: max abs diff "
                                               f"{worst:.2e} (tolerance {FP32_ABS_TOL:g}; {len(built.engine)} bytes)")


#: (batch, length, ragged): short path, hashed path at chunk multiples and not, padded rows, the profile's edges.
SELF_TEST_CASES = ((1, 1, False), (2, 5, False), (3, 40, True), (1, 27, False), (2, 64, True), (3, 64, False))


def tiny_model() -> ReformerLM:
    """A random 3-layer LM (LSH, local, LSH; 2 hash rounds; chunk 8) small enough to export and build in seconds."""
    config = ReformerConfig(vocab_size=32, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                            attn_layers=("lsh", "local", "lsh"), feed_forward_size=64, axial_pos_embds=False,
                            max_position_embeddings=64, lsh_attn_chunk_length=8, local_attn_chunk_length=8,
                            num_hashes=2, num_buckets=4, hash_seed=1, is_decoder=True)
    torch.manual_seed(0)
    model = ReformerLM(config)
    with torch.no_grad():  # default inits leave layer norms at 1/0; perturb so every weight matters
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()



PROBES = (("python", check_python), ("torch", check_torch), ("triton", check_triton),
          ("onnxruntime", check_onnxruntime), (TENSORRT, check_tensorrt), (PLUGIN, check_plugin))
