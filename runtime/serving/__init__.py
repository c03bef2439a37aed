"""reformer_rt.runtime.serving: the KServe v2 / Open Inference Protocol server behind ``reformer-rt serve``.

``protocol`` (the wire format and error mapping, defined once) -> ``model`` (a Session as a v2 model) ->
``routes`` (the HTTP endpoints, for any HTTP stack) -> ``scheduler`` (length-bucketed dynamic batching that keeps
the batching contract) -> ``server`` (lifecycle, access control) with its transports ``http_api`` (aiohttp) and
``grpc_api`` (grpc.aio), and ``metrics`` (Prometheus, Triton's names). ``triton_python`` is the model of a Triton
Python-backend repository; ``process`` runs ``reformer-rt serve`` as a child process.

Importing the package imports nothing heavy: ``protocol``, ``model`` and ``triton_python`` need numpy only (the
Triton Python backend's environment needs no web stack); the transports need the ``serve`` extra (aiohttp,
grpcio, tritonclient[grpc], prometheus-client), checked by ``require_serve_extra``.
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
