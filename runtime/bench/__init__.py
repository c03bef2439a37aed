"""reformer_rt.runtime.bench: benchmarks as commands -- ``reformer-rt bench`` (forward passes, ``forward.py``),
``bench serve`` (a KServe v2 server under concurrent clients, ``serve.py``), ``bench generate`` (cached decoding,
``generate.py``) and the GPU benchmark of kernels and models (``gpu.py``, run by ``make gpu-check``).

Importing the runtime imports none of them.
"""
