"""Check an exported graph against the PyTorch model in ONNX Runtime (CPU) on fresh random inputs.

The cases use shapes other than the trace sample: a single token, a length below one chunk, lengths that are
not a multiple of the chunk multiple, and a ragged batch whose rows are padded by ``attention_mask``. Outputs
are compared at real tokens only (mask 1): what a model returns at padding positions is unspecified, in HF as
here. float32 graphs must agree within ``FP32_ABS_TOL`` (absolute); float16 graphs, compared with the float32
PyTorch model, within ``FP16_REL_TOL`` of the largest reference magnitude. Plugin-form graphs run with the
Python implementation of the op (``ort_custom_op``).

Known limit: ONNX Runtime's CPU provider lacks float16 kernels for some ops; such a float16 graph is reported
as not run (with the reason) instead of failing the export -- its structure is still checked by onnx.checker.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import TensorProto

from reformer_rt.models import Reformer, task_of

from . import ort_custom_op
from .errors import ExportError, ValidationError

if TYPE_CHECKING:
    import onnxruntime

FP32_ABS_TOL = 1e-4
FP16_REL_TOL = 2e-2
ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclasses.dataclass(frozen=True)
class CaseResult:
    batch: int
    length: int
    ragged: bool
    max_abs_diff: float
    max_rel_diff: float


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    ran: bool
    passed: bool
    metric: str  # "abs" (float32) or "rel" (float16)
    tolerance: float
    cases: tuple[CaseResult, ...]
    note: str = ""

    @property
    def max_diff(self) -> float:
        values = [c.max_abs_diff if self.metric == "abs" else c.max_rel_diff for c in self.cases]
        return max(values, default=0.0)


def validation_shapes(chunk_multiple: int, low: int, high: int, sample_length: int) -> list[tuple[int, int, bool]]:
    """(batch, length, ragged) cases in [1, high], none at the trace sample's length."""
    m = chunk_multiple
    wanted = [(1, 1, False), (3, max(2, m // 2), False), (2, m + 3, False), (3, 3 * m + 5, True),
              (1, 5 * m - 1, False), (2, low, True)]
    shapes, seen = [], set()
    for batch, length, ragged in wanted:
        length = min(length, high)
        if length != sample_length and (batch, length) not in seen:
            seen.add((batch, length))
            shapes.append((batch, length, ragged))
    return shapes


def random_inputs(vocab_size: int, batch: int, length: int, ragged: bool,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if ragged:  # row r keeps a shrinking prefix of real tokens, the rest is padding
        for row in range(1, batch):
            mask[row, max(1, length - row * max(1, length // batch)):] = 0
    return ids, mask


def validate(model: onnx.ModelProto, torch_model: Reformer, attention: str, dtype: str,
             shapes: list[tuple[int, int, bool]], seed: int = 0) -> ValidationResult:
    """Run ``model`` and ``torch_model`` on the same inputs and compare (module docstring)."""
    metric, tolerance = ("abs", FP32_ABS_TOL) if dtype == "float32" else ("rel", FP16_REL_TOL)
    if attention == "plugin":
        model = ort_custom_op.validation_copy(model, ONNX_TYPES[dtype])
    with tempfile.TemporaryDirectory(prefix="reformer_rt_validate_") as tmp:
        session, note = _session(model, attention, Path(tmp))
        if session is None:
            return ValidationResult(False, True, metric, tolerance, (), note)
        generator = torch.Generator().manual_seed(seed)
        per_position = task_of(torch_model).per_position
        cases = []
        for batch, length, ragged in shapes:
            ids, mask = random_inputs(torch_model.config.vocab_size, batch, length, ragged, generator)
            with torch.no_grad():
                expected = torch_model(ids, mask)
            expected = tuple(expected) if isinstance(expected, tuple) else (expected,)
            got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            valid = mask.numpy() != 0
            compared = [_compare(g.astype(np.float32), e.float().numpy(), valid if positional else None, batch,
                                 length, ragged) for g, e, positional in zip(got, expected, per_position)]
            cases.append(max(compared, key=lambda c: c.max_abs_diff))
    result = ValidationResult(True, True, metric, tolerance, tuple(cases))
    return dataclasses.replace(result, passed=result.max_diff <= tolerance)


def _compare(got: np.ndarray, expected: np.ndarray, valid: np.ndarray | None, batch: int, length: int,
             ragged: bool) -> CaseResult:
    """One output compared at real tokens (``valid``: mask [B, L]; None for per-sequence outputs: every entry)."""
    if got.shape != expected.shape:
        raise ValidationError(f"validation: graph output shape {got.shape} at input [{batch}, {length}]; "
                              f"expected {expected.shape} as the PyTorch model gives")
    if valid is None:
        valid = np.ones(got.shape, dtype=bool)
    diff = np.abs(got - expected)[valid]
    scale = float(np.abs(expected[valid]).max()) or 1.0
    worst = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    return CaseResult(batch, length, ragged, worst, worst / scale)


def _session(model: onnx.ModelProto, attention: str,
             tmp: Path) -> tuple[onnxruntime.InferenceSession | None, str]:
    """A CPU session for ``model``, or (None, why) when ONNX Runtime has no CPU kernel for one of its ops."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("validation needs onnxruntime (pip install onnxruntime), or pass validate=False / "
                          "--no-validate") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if attention == "plugin":
        options.register_custom_ops_library(ort_custom_op.custom_op_library())
    source: str | bytes
    if model.ByteSize() < 2**31 - 2**20:
        source = model.SerializeToString()
    else:
        source = str(tmp / "validate.onnx")
        onnx.save_model(model, source, save_as_external_data=True, location="validate.onnx.data")
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]), ""
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        if "NOT_IMPLEMENTED" in str(exc) or "Could not find an implementation" in str(exc):
            return None, f"ONNX Runtime CPU cannot run this graph ({str(exc).splitlines()[0][:300]})"
        raise
