"""Triton kernels of the LSH attention op: pure ``@triton.jit`` code, no torch.library, no TensorRT.

The launchers in ``reformer_rt.plugins.lsh_triton`` validate inputs, allocate outputs and choose grids; the
TensorRT plugin launches the same kernels. Semantics: the v1 contract in ``reformer_rt.models.lsh``.
"""

from .lsh import _lsh_attend_kernel, _lsh_combine_kernel, _lsh_hash_kernel

__all__ = ["_lsh_attend_kernel", "_lsh_combine_kernel", "_lsh_hash_kernel"]
