"""reformer_rt.runtime: running exported or PyTorch Reformer models, and the ``reformer-rt`` command line."""
