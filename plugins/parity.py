"""How the Triton kernels are judged against the fp32 reference: the tolerances, named once, and the comparison.

Used by the interpreter tests (``tests/plugins``), the compiled-kernel tests (``tests/gpu``), ``bench/gpu.py``,
``reformer-rt doctor`` and ``make gpu-check``.

* fp32: max abs error <= ``FP32_TOL`` (1e-5); bucket ids and sort order equal element for element.
* fp16: compared with the reference run on the same fp16 inputs (it computes in fp32 and rounds its output to
  fp16). The kernels round the softmax weights to fp16 for the ``p @ v`` dot (relative error <= u = 2^-11 each,
  so <= u * max|v| on the output), keep per-round rows in fp16 (<= u * max|v| more) and round the output (two
  roundings of values that agree to the above differ by at most their difference plus one ulp, <= 2u * max|v|):
  hence ``4 * u * max|v|``.

Inputs come from one recipe (``random_inputs``): drawn on the CPU from a seeded generator, so every device sees
the same numbers, with the last batch row losing its last third of tokens when ``padded``.
"""

from __future__ import annotations

import dataclasses

import torch

from reformer_rt.models.lsh import LSHAttrs, lsh_attention_reference, lsh_hash, lsh_sort, make_rotations

from .lsh_triton import lsh_attention_triton, lsh_hash_triton, lsh_sort_triton

FP32_TOL = 1e-5
FP16_UNIT_ROUNDOFF = 2.0**-11


def tolerance(v: torch.Tensor) -> float:
    """Largest max-abs error allowed between the kernels and the reference for value vectors ``v``."""
    if v.dtype == torch.float32:
        return FP32_TOL
    return 4 * FP16_UNIT_ROUNDOFF * v.float().abs().max().item()


def random_inputs(shape: tuple[int, int, int, int], attrs: LSHAttrs, dtype: torch.dtype, seed: int = 0,
                  padded: bool = True, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """qk, v [B,H,L,D] of ``dtype``, rotations [H,D,n_hashes,rot/2] fp32 and mask [B,L] int32 on ``device``."""
    batch, heads, length, dim = shape
    generator = torch.Generator().manual_seed(seed)
    qk = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    rotations = make_rotations(seed + 1, heads, dim, attrs)
    mask = torch.ones(batch, length, dtype=torch.int32)
    if padded:
        mask[-1, length - max(1, length // 3):] = 0
    return tuple(t.to(device) for t in (qk, v, rotations, mask))


@dataclasses.dataclass(frozen=True)
class Parity:
    """Kernels vs reference on one input: output error, its tolerance, and hashing/sort mismatches (element
    counts; 0 and 0 when L <= chunk_length, where nothing is hashed)."""

    max_abs_err: float
    tolerance: float
    bucket_mismatches: int
    order_mismatches: int

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tolerance and self.bucket_mismatches == 0 and self.order_mismatches == 0


@torch.inference_mode()
def compare(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor, attrs: LSHAttrs,
            reference_device: str | torch.device | None = None) -> Parity:
    """Run the kernels where the inputs are and the reference on ``reference_device`` (default: the same)."""
    device = torch.device(reference_device) if reference_device is not None else qk.device
    ref_inputs = [t.to(device) for t in (qk, v, rotations, mask)]
    out = lsh_attention_triton(qk, v, rotations, mask, attrs).float().to(device)
    error = (out - lsh_attention_reference(*ref_inputs, attrs).float()).abs().max().item()
    buckets_wrong = order_wrong = 0
    if qk.shape[2] > attrs.chunk_length:
        buckets = lsh_hash_triton(qk, rotations, mask, attrs)
        ref_buckets = lsh_hash(ref_inputs[0], ref_inputs[2], ref_inputs[3], attrs)
        buckets_wrong = int((buckets.long().to(device) != ref_buckets).sum())
        order_wrong = int((lsh_sort_triton(buckets).to(device) != lsh_sort(ref_buckets)).sum())
    return Parity(error, tolerance(v), buckets_wrong, order_wrong)
