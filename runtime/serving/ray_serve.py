"""Scale-out on Ray Serve: replicas of one deployment, each holding a Session per model, behind Ray's HTTP proxy,
speaking the same KServe v2 HTTP endpoints as ``reformer-rt serve`` (``serving/routes.py``: JSON and binary
tensors, so ``tritonclient.http`` works unchanged).

    reformer-rt serve --ray --replicas 2 demo=models/demo          # a local cluster, or --address to join one
    serve run serve_config.yaml                                    # cluster operators (README: "Scaling out")
    app = build_app({"models": {"demo": "models/demo"}})           # Python: serve.run(app, route_prefix="/")

Batching: every sequence of a request is one item of ``@serve.batch``, whose ``batch_size_fn`` counts padded tokens
(each sequence at its length bucket), up to ``max_tokens_per_batch``. A collected batch runs per model through
``Session.run_jobs``, which splits it by length bucket and token budget (``runtime/batching.py``), so each result
equals its sequence run alone. Replicas: ``num_gpus=1`` each when the device is CUDA (one per GPU), else CPU
replicas of ``num_cpus`` cores with that many threads; ``num_replicas``, autoscaling
(``min_replicas``/``max_replicas``), ``max_ongoing_requests`` and ``max_queued_requests`` (over it: 503) are
deployment options. The forward pass runs on one worker thread per replica, so the replica's event loop (Ray's
health checks) stays responsive.

Generation (``generating.py``: generated outputs of v2 infer, the generate extension and its server-sent events)
runs on the replica's worker, not through ``@serve.batch``.

Known limits: HTTP only (no gRPC listener, no Triton-named Prometheus metrics: Ray Serve exposes its own);
``priority`` and ``timeout`` request parameters are accepted and not applied (Ray's queue has neither); the
statistics endpoint answers 400 (counts would be one replica's). Multi-node clusters and GPU replicas have not
been run by this project's tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reformer_rt.export.metadata import package_version
from reformer_rt.models import InputError

from ..artifacts import max_length_of
from ..batching import DEFAULT_MAX_TOKENS, bucket_length
from ..generation import TokenEvent
from ..outputs import SequenceJob
from . import generating
from .model import ServedModel
from .protocol import BadRequest, InferRequest, InferResponse, PayloadTooLarge
from .routes import check_restricted, find_slot, handle, repository_index
from .scheduler import iterate_in_worker

log = logging.getLogger("reformer_rt.serve")

DEPLOYMENT = "ReformerDeployment"
APP_NAME = "reformer-rt"
DEFAULT_MAX_BODY = 64 << 20
#: Response header naming the replica that answered (which replica served what, in logs and tests).
REPLICA_HEADER = "X-Reformer-Replica"


@dataclasses.dataclass(frozen=True)
class RayServeOptions:
    """What a replica needs; everything else (replicas, autoscaling, resources) is a Ray deployment option."""

    models: dict[str, dict[str, Any]]  # name -> {"path", optional "backend", "device", "dtype"}
    backend: str = "auto"
    device: str | None = None
    dtype: str = "float32"
    threads: int = 1
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS
    batch_wait_timeout_s: float = 0.002
    max_body_bytes: int = DEFAULT_MAX_BODY
    restricted_header: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class _Item:
    """One sequence of one request, as ``@serve.batch`` sees it."""

    model: str
    job: SequenceJob
    bucket: int


@dataclasses.dataclass
class _Slot:
    model: ServedModel
    ready: bool = True


class ReformerReplica:
    """The body of the deployment (``deployment()`` wraps it): one replica, every model, the v2 endpoints."""

    def __init__(self, options: RayServeOptions) -> None:
        from ..session import Session

        self.options = options
        self.live = self.ready = False
        self.models: dict[str, _Slot] = {}
        for name, spec in options.models.items():
            session = Session(spec["path"], backend=spec.get("backend", options.backend),
                              device=spec.get("device", options.device), threads=options.threads,
                              max_tokens_per_batch=options.max_tokens_per_batch,
                              dtype=spec.get("dtype", options.dtype))
            session.run([[0] * min(64, session.max_length)], outputs=list(session.outputs))  # warm-up
            self.models[name] = _Slot(ServedModel(name, session))
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reformer-rt-replica")
        self.replica = _replica_id()
        self.live = self.ready = True

    # ---------------------------------------------------------------------------------------- the v2 host
    def check_access(self, headers: Mapping[str, str]) -> None:
        check_restricted(headers, self.options.restricted_header)

    def entry(self, name: str, version: str = "") -> _Slot:
        return find_slot(self.models, name, version)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": APP_NAME, "version": package_version(), "extensions": ["binary_tensor_data",
                                                                               "model_repository"]}

    def repository_index(self) -> list[dict[str, str]]:
        return repository_index(self.models)

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        raise BadRequest("statistics: under Ray Serve each replica counts only its own requests; read Ray Serve's "
                         "metrics (ray_serve_* on the cluster's metrics endpoint) instead")

    def _run(self, make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        return iterate_in_worker(self._worker, make)

    async def infer(self, model_name: str, model_version: str, decode: Callable[[], InferRequest]) -> InferResponse:
        slot = self.entry(model_name, model_version)
        request = decode()
        generate = generating.parse_infer(slot.model, request)
        if generate is not None:  # a generation: whole, on this replica's worker (not batched with others)
            tokens, _ = await generating.collect(slot.model, generate, self._run)
            return generating.infer_response(slot.model, request, generate, tokens)
        parsed = slot.model.parse(request, default_priority=0)
        config = slot.model.session.config
        items = [_Item(model_name, job, bucket_length(config, len(job.sequence))) for job in parsed.jobs()]
        results = await asyncio.gather(*(self.batched(item) for item in items))
        rows = {kind.name: [r[kind.name] for r in results] for kind in parsed.kinds}
        return slot.model.respond(request, parsed, rows)

    async def generate(self, model_name: str, model_version: str, body: bytes) -> dict[str, Any]:
        slot = self.entry(model_name, model_version)
        request = generating.parse_json(slot.model, body)
        tokens, reasons = await generating.collect(slot.model, request, self._run)
        return generating.json_answer(slot.model, request, tokens, reasons)

    async def generate_stream(self, model_name: str, model_version: str, request: Any
                              ) -> AsyncIterator[tuple[TokenEvent, str]]:
        slot = self.entry(model_name, model_version)
        if isinstance(request, bytes):
            request = generating.parse_json(slot.model, request)
        text = generating.TextDelta(slot.model, len(request.prompts))
        async for event in generating.stream(slot.model, request, self._run):
            yield event, text.add(event)

    async def __call__(self, request: Any) -> Any:  # a starlette Request; Ray Serve's HTTP proxy calls this
        from starlette.responses import Response, StreamingResponse

        async def read_body() -> bytes:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.options.max_body_bytes:
                raise PayloadTooLarge(f"request body over {self.options.max_body_bytes:,} bytes; send fewer or "
                                      "shorter sequences per request")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.options.max_body_bytes:
                    raise PayloadTooLarge(f"request body over {self.options.max_body_bytes:,} bytes")
            return bytes(body)

        reply = await handle(self, request.method, request.url.path, request.headers, read_body)
        headers = {**reply.headers, REPLICA_HEADER: self.replica}
        if reply.stream is not None:
            return StreamingResponse(_chunks(reply.body, reply.stream), status_code=reply.status, headers=headers)
        return Response(reply.body, status_code=reply.status, headers=headers)

    # ------------------------------------------------------------------------------------------ batching
    async def batched(self, item: _Item) -> dict[str, np.ndarray]:
        """Replaced per deployment by a ``@serve.batch`` method (see ``deployment``)."""
        return (await self.run_items([item]))[0]

    async def run_items(self, items: list[_Item]) -> list[dict[str, np.ndarray]]:
        """One ``@serve.batch`` batch: per model, ``Session.run_jobs`` -- split by length bucket and the token
        budget, as the batching contract says -- on the worker thread."""
        by_model: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_model.setdefault(item.model, []).append(index)
        results: list[dict[str, np.ndarray]] = [{} for _ in items]
        loop = asyncio.get_running_loop()
        for model, members in by_model.items():
            session = self.models[model].model.session
            jobs = [items[i].job for i in members]
            outs, _ = await loop.run_in_executor(self._worker, session.run_jobs, jobs)
            for i, out in zip(members, outs):
                results[i] = out
        return results


async def _chunks(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Ray Serve replica (a plain instance in tests or tools)
        return "local"


def padded_tokens(items: list[_Item]) -> int:
    """``batch_size_fn``: the padded tokens of a batch, each sequence at its length bucket."""
    return sum(item.bucket for item in items)


def deployment(options: RayServeOptions, **deployment_options: Any) -> Any:
    """The Ray Serve deployment (unbound): ``@serve.batch`` sized in padded tokens, ``ray_actor_options`` from the
    device (one GPU per replica on CUDA, else ``options.threads`` CPUs)."""
    from ray import serve

    longest = max(max_length_of(Path(spec["path"])) for spec in options.models.values())
    budget = max(options.max_tokens_per_batch, longest)  # one sequence alone must always fit; run_items splits

    class ReformerDeployment(ReformerReplica):
        @serve.batch(max_batch_size=budget, batch_wait_timeout_s=options.batch_wait_timeout_s,
                     batch_size_fn=padded_tokens)
        async def batched(self, items: list[_Item]) -> list[dict[str, np.ndarray]]:
            return await self.run_items(items)

    cuda = any(str(spec.get("device", options.device) or "").startswith("cuda") for spec in options.models.values())
    actor = {"num_gpus": 1} if cuda else {"num_cpus": options.threads}
    settings = {"ray_actor_options": actor, **deployment_options}
    return serve.deployment(ReformerDeployment, name=DEPLOYMENT, **settings)


def build_app(args: dict[str, Any]) -> Any:
    """The application for ``serve run`` / ``serve.run``: ``args`` are ``RayServeOptions`` fields (``models`` as
    name -> path or {"path", "backend", "device"}); deployment options come from the config file's
    ``deployments`` section or ``deployment``'s keywords."""
    models = args.get("models")
    if not isinstance(models, dict) or not models:
        raise InputError("models: expected a mapping of names to paths, such as {\"demo\": \"models/demo\"}")
    specs = {name: {"path": value} if isinstance(value, str) else dict(value) for name, value in models.items()}
    fields = {f.name for f in dataclasses.fields(RayServeOptions)} - {"models"}
    unknown = sorted(set(args) - fields - {"models"})
    if unknown:
        raise InputError(f"application args: unknown {unknown}; expected 'models' and {sorted(fields)}")
    restricted = args.get("restricted_header")
    options = RayServeOptions(specs, **{k: v for k, v in args.items() if k in fields and k != "restricted_header"},
                              restricted_header=tuple(restricted) if restricted else None)
    return deployment(options).bind(options)


# ------------------------------------------------------------------------------------------ reformer-rt serve --ray
def _scaling(args: Any) -> dict[str, Any]:
    """Deployment options from ``--replicas`` / ``--autoscale`` / ``--max-ongoing-requests`` /
    ``--max-queued-requests``."""
    out: dict[str, Any] = {}
    if args.autoscale:
        low, sep, high = args.autoscale.partition(":")
        if not (sep and low.isdigit() and high.isdigit() and 0 <= int(low) <= int(high) and int(high) >= 1):
            raise InputError(f"--autoscale: got {args.autoscale!r}; expected MIN:MAX replicas, such as 1:4")
        out["autoscaling_config"] = {"min_replicas": int(low), "max_replicas": int(high)}
    else:
        replicas = 1 if args.replicas is None else args.replicas
        if replicas < 1:
            raise InputError(f"--replicas: got {replicas}; expected >= 1")
        out["num_replicas"] = replicas
    for name in ("max_ongoing_requests", "max_queued_requests"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise InputError(f"--{name.replace('_', '-')}: got {value}; expected >= 1")
            out[name] = value
    return out


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve_on_ray(args: Any, config: dict[str, Any]) -> int:
    """``reformer-rt serve --ray``: deploy on a local Ray cluster (or join ``--address``), serve until SIGTERM or
    SIGINT, then remove the application (and stop the cluster this command started)."""
    import signal
    import threading

    from ..commands.serve import restricted_header

    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Serve ({exc}): pip install \"reformer-rt[ray]\"") from exc
    if config["tls_cert"]:
        raise InputError("--tls-cert with --ray: Ray Serve's HTTP proxy does not take this certificate; terminate "
                         "TLS in front of it (a load balancer or ingress), or serve without --ray")
    if not config["batching"]:
        raise InputError("--no-batching with --ray: not supported; set --max-queue-delay-us 0 for the shortest "
                         "batching delay")
    options = RayServeOptions(
        config["models"], backend=config["backend"], device=config["device"], dtype=config["dtype"],
        threads=config["threads"] or 1,
        max_tokens_per_batch=config["max_tokens_per_batch"], batch_wait_timeout_s=config["max_queue_delay_us"] / 1e6,
        max_body_bytes=config["max_body_mb"] << 20, restricted_header=restricted_header(config["restricted_header"]))
    scaling = _scaling(args)
    port = config["http_port"] or _free_port(config["host"])
    started = not ray.is_initialized() and args.address is None
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    log.info("reformer-rt serve: Ray %s cluster %s, %s", ray.__version__, args.address or "local (started here)",
             ", ".join(f"{k}={v}" for k, v in scaling.items()))
    serve.start(http_options={"host": config["host"], "port": port})
    serve.run(deployment(options, **scaling).bind(options), name=APP_NAME, route_prefix="/")
    log.info("reformer-rt serve: HTTP/REST (KServe v2, Ray Serve) on http://%s:%d", config["host"], port)
    log.info("reformer-rt serve: ready (%s)", ", ".join(sorted(options.models)))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("reformer-rt serve: signal received; removing the application")
    serve.delete(APP_NAME)
    if started:
        serve.shutdown()
        ray.shutdown()
    log.info("reformer-rt serve: stopped")
    return 0
