"""reformer_rt.plugins: Triton kernels for the LSH attention op and their framework glue (torch, TensorRT)."""
