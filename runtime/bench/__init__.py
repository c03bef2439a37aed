"""reformer_rt.runtime.bench: benchmarks as commands, on one harness.

* ``forward.py`` -- ``reformer-rt bench``: forward passes per backend, length and batch, with the HF baseline;
* ``generate.py`` -- ``reformer-rt bench generate``: cached decoding, ms per token, with the HF baseline;
* ``accuracy.py`` -- ``reformer-rt bench accuracy``: what int8 costs on text (bits per token, top-1 and LSH bucket
  agreement) per backend and quantization choice, against the float model;
* ``serve.py`` -- ``reformer-rt bench serve``: a concurrency sweep against a KServe v2 server (started through
  ``server_process.py``, or one already running);
* ``gpu.py`` -- the GPU benchmark of the kernels and models that ``make gpu-check`` runs, with its tables and
  targets in ``gpu_report.py`` and the dense baseline to beat in ``dense_baseline.py``.

``harness.py`` holds what they share: the ``Point`` each measurement fills (what, implementation, batch, length,
seconds, peak bytes, error) and that the JSON, tables and plots read; the fresh-process worker (spec as JSON in,
point as JSON out, timeout, user versus internal errors); peak memory; the machine, date and library versions of
a report; the ``--out`` check; failures to exit code; the markdown table and the plot. A bench module holds what
it measures and its arguments.

Importing the runtime imports none of them.
"""
