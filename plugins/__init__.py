"""reformer_rt.plugins: Triton kernels for the LSH attention op and their framework glue.

Importing the package registers ``lsh_attention_triton`` as the ``triton`` implementation of the torch op
``reformer_rt::LSHAttention`` (``reformer_rt.models.lsh_op``), which selects it for CUDA tensors or inside
``forced_kernels("triton")`` (``REFORMER_RT_KERNELS=triton`` on the command line). On CPU tensors the launcher
refuses to run unless Triton's interpreter is on (``TRITON_INTERPRET=1`` before triton is imported). Layers:
``kernels/`` (``@triton.jit`` code) -> ``lsh_triton`` (launchers) -> this module (registration).

Known limits: triton is an optional dependency; without it this import raises ImportError saying what to install.
"""

try:
    import triton  # noqa: F401  (probe only: the kernels need it)
except ImportError as exc:
    raise ImportError("reformer_rt.plugins needs Triton for its LSH attention kernels: pip install triton "
                      f"(import failed: {exc})") from exc

from reformer_rt.models.lsh_op import register_implementation

from .lsh_triton import lsh_attention_triton, lsh_hash_triton, lsh_sort_triton

register_implementation("triton", lsh_attention_triton)

__all__ = ["lsh_attention_triton", "lsh_hash_triton", "lsh_sort_triton"]
