"""reformer_rt.runtime.serving: the KServe v2 / Open Inference Protocol server behind ``reformer-rt serve``.

``protocol`` (the wire format and error mapping, defined once) -> ``model`` (a Session as a v2 model) ->
``scheduler`` (length-bucketed dynamic batching that keeps the batching contract) -> ``server`` (lifecycle,
access control) with its transports ``http_api`` (aiohttp) and ``grpc_api`` (grpc.aio), and ``metrics``
(Prometheus, Triton's names). Needs the ``serve`` extra: aiohttp, grpcio, tritonclient[grpc] (for the generated
gRPC service classes), prometheus-client.
"""

try:
    import aiohttp  # noqa: F401  (probes: the transports need them)
    import grpc  # noqa: F401
    import prometheus_client  # noqa: F401
    import tritonclient.grpc  # noqa: F401
except ImportError as exc:
    from reformer_rt.runtime.errors import BackendUnavailable

    raise BackendUnavailable(f"reformer-rt serve needs the serve extra ({exc}): pip install \"reformer-rt[serve]\"") \
        from exc

from .model import ServedModel
from .scheduler import SchedulerOptions
from .server import InferenceServer, ServerOptions

__all__ = ["InferenceServer", "SchedulerOptions", "ServedModel", "ServerOptions"]
