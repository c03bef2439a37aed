"""reformer_rt.runtime.serving: the KServe v2 / Open Inference Protocol server behind ``reformer-rt serve``.

``protocol`` (the wire format and error mapping, defined once) -> ``model`` (a Session as a v2 model: inputs,
outputs, metadata) -> ``service`` (one ``ModelService`` per model: infer, generate, streams, readiness, warm-up --
written once, parameterised by a ``Runner``) -> hosts, which keep lifecycle, access control and listeners:

* ``server`` (``reformer-rt serve``): runner ``scheduler`` (length-bucketed dynamic batching that keeps the
  batching contract), ``metrics`` (Prometheus, Triton's names); transports ``http_api`` (aiohttp, over the
  stack-neutral endpoint table ``routes``) and ``grpc_api`` (grpc.aio), composed by ``commands/serve.py``;
* ``ray_serve`` (a Ray Serve deployment): runner ``RayRunner`` (``@serve.batch``), the same ``routes``;
* ``triton_python`` (Triton's Python backend): runner ``GatherRunner``; ``triton_repo`` writes such repositories.

Transports see a host through ``host.Host`` only; model specs (``NAME=PATH``, config entries) parse once in
``spec``. Importing the package imports nothing heavy: ``protocol``, ``model``, ``service`` and ``triton_python``
need numpy only (the Triton Python backend's environment needs no web stack); the transports need the ``serve``
extra (aiohttp, grpcio, tritonclient[grpc], prometheus-client), checked by ``require_serve_extra``.
"""

from __future__ import annotations

import importlib

SERVE_EXTRA = ("aiohttp", "grpc", "prometheus_client", "tritonclient.grpc")


def require_serve_extra() -> None:
    """``BackendUnavailable`` naming the install line when a package of the ``serve`` extra is missing."""
    from ..errors import BackendUnavailable

    for module in SERVE_EXTRA:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise BackendUnavailable(f"reformer-rt serve needs the serve extra ({exc}): pip install "
                                     "\"reformer-rt[serve]\"") from exc
