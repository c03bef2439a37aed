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

Each model is a ``ModelService`` (``service.py``: infer, generate, streams, metadata, the warm-up) whose runner,
``RayRunner``, hands sequences to ``@serve.batch`` and runs generations on the replica's worker (not through
``@serve.batch``); the replica itself keeps only lifecycle, access control and the Starlette listener.

Several nodes: ``max_replicas_per_node`` (a deployment option; ``serve --ray --max-replicas-per-node``) spreads
replicas; every reply names its replica and Ray node (``X-Reformer-Replica``, ``X-Reformer-Node``). A request whose
replica is lost with its node before answering gets a 500 from Ray Serve's proxy, without ``X-Reformer-Replica``
(Ray Serve 2.x maps an actor's death to 500 and has no hook to change it), or a closed connection where the proxy
went too: both are safe to retry, and README "Scaling out" says so to clients.

Known limits: HTTP only (no gRPC listener, no Triton-named Prometheus metrics: Ray Serve exposes its own);
``priority`` and ``timeout`` request parameters are accepted and not applied (Ray's queue has neither); the
statistics endpoint answers 400 (counts would be one replica's). Multi-node runs in this project's tests are two
nodes on one machine (``tests/runtime/test_ray_cluster.py``); GPU replicas have not been run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from reformer_rt.export.metadata import package_version
from reformer_rt.models import InputError

from ..artifacts import max_length_of
from ..batching import bucket_length
from ..outputs import SequenceJob
from .generating import GenerationLimits
from .host import DEFAULT_MAX_BODY, check_restricted, find_service, repository_index
from .model import ParsedRequest, ServedModel
from .protocol import BadRequest, PayloadTooLarge
from .routes import handle
from .scheduler import iterate_in_worker
from .service import Completed, ModelService
from .spec import ModelSpec, SessionDefaults, model_specs

log = logging.getLogger("reformer_rt.serve")

T = TypeVar("T")
DEPLOYMENT = "ReformerDeployment"
APP_NAME = "reformer-rt"
#: Response headers naming the replica that answered and the Ray node it runs on (which replica and node served
#: what, in logs and placement checks).
REPLICA_HEADER = "X-Reformer-Replica"
NODE_HEADER = "X-Reformer-Node"


@dataclasses.dataclass(frozen=True)
class RayServeOptions:
    """What a replica needs; everything else (replicas, autoscaling, resources) is a Ray deployment option."""

    models: tuple[ModelSpec, ...]
    defaults: SessionDefaults = SessionDefaults(threads=1)
    batch_wait_timeout_s: float = 0.002
    max_body_bytes: int = DEFAULT_MAX_BODY
    restricted_header: tuple[str, str] | None = None
    generation: GenerationLimits = GenerationLimits()


@dataclasses.dataclass(frozen=True)
class _Item:
    """One sequence of one request, as ``@serve.batch`` sees it."""

    model: str
    job: SequenceJob
    bucket: int


class RayRunner:
    """The ``Runner`` of one model on a replica: sequences go through the deployment's ``@serve.batch`` (sized in
    padded tokens), generations and the warm-up run on the replica's worker thread."""

    def __init__(self, replica: ReformerReplica, model: ServedModel) -> None:
        self.replica, self.model = replica, model

    async def forward(self, parsed: ParsedRequest) -> Completed:
        config = self.model.session.config
        items = [_Item(self.model.name, job, bucket_length(config, len(job.sequence))) for job in parsed.jobs()]
        results = await asyncio.gather(*(self.replica.batched(item) for item in items))
        return Completed({kind.name: [r[kind.name] for r in results] for kind in parsed.kinds})

    def iterate(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        return iterate_in_worker(self.replica.worker, make)

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.replica.worker, fn)


class ReformerReplica:
    """The body of the deployment (``deployment()`` wraps it): one replica, every model, the v2 endpoints. Ray Serve
    awaits its constructor, which opens and warms up every model."""

    async def __init__(self, options: RayServeOptions) -> None:
        self.options = options
        self.live = self.ready = False
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reformer-rt-replica")
        self.services: dict[str, ModelService] = {}
        for spec in options.models:
            model = ServedModel(spec.name, spec.open(options.defaults))
            self.services[spec.name] = ModelService(model, RayRunner(self, model), limits=options.generation)
        for service in self.services.values():
            await service.warm_up()
        self.replica, self.node = _replica_id(), _node_id()
        self.live = self.ready = True

    # ---------------------------------------------------------------------------------------- the v2 host
    def check_access(self, headers: Mapping[str, str]) -> None:
        check_restricted(headers, self.options.restricted_header)

    def service(self, name: str, version: str = "") -> ModelService:
        return find_service(self.services, name, version)

    def server_metadata(self) -> dict[str, Any]:
        generate = ["generate"] if any(s.model.can_generate for s in self.services.values()) else []
        return {"name": APP_NAME, "version": package_version(),
                "extensions": ["binary_tensor_data", "model_repository", *generate]}

    def repository_index(self) -> list[dict[str, str]]:
        return repository_index(self.services)

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        raise BadRequest("statistics: under Ray Serve each replica counts only its own requests; read Ray Serve's "
                         "metrics (ray_serve_* on the cluster's metrics endpoint) instead")

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
        headers = {**reply.headers, REPLICA_HEADER: self.replica, NODE_HEADER: self.node}
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
            session = self.services[model].model.session
            jobs = [items[i].job for i in members]
            outs, _ = await loop.run_in_executor(self.worker, session.run_jobs, jobs)
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


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # Ray is not connected (a plain instance in tests or tools)
        return "local"


def padded_tokens(items: list[_Item]) -> int:
    """``batch_size_fn``: the padded tokens of a batch, each sequence at its length bucket."""
    return sum(item.bucket for item in items)


def deployment(options: RayServeOptions, **deployment_options: Any) -> Any:
    """The Ray Serve deployment (unbound): ``@serve.batch`` sized in padded tokens, ``ray_actor_options`` from the
    device (one GPU per replica on CUDA, else ``options.defaults.threads`` CPUs)."""
    from ray import serve

    defaults = options.defaults
    longest = max(max_length_of(Path(spec.path)) for spec in options.models)
    budget = max(defaults.max_tokens_per_batch, longest)  # one sequence alone must always fit; run_items splits

    class ReformerDeployment(ReformerReplica):
        @serve.batch(max_batch_size=budget, batch_wait_timeout_s=options.batch_wait_timeout_s,
                     batch_size_fn=padded_tokens)
        async def batched(self, items: list[_Item]) -> list[dict[str, np.ndarray]]:
            return await self.run_items(items)

    cuda = any((spec.device or defaults.device or "").startswith("cuda") for spec in options.models)
    actor = {"num_gpus": 1} if cuda else {"num_cpus": defaults.threads}
    settings = {"ray_actor_options": actor, **deployment_options}
    return serve.deployment(ReformerDeployment, name=DEPLOYMENT, **settings)


#: ``build_app`` arguments besides ``models``: the session defaults and the replica's own options.
APP_ARGS = (*(f.name for f in dataclasses.fields(SessionDefaults)), "batch_wait_timeout_s", "max_body_bytes",
            "restricted_header", "max_new_tokens")


def build_app(args: dict[str, Any]) -> Any:
    """The application for ``serve run`` / ``serve.run``: ``args`` holds ``models`` (name -> path or {"path",
    "backend", "device", "dtype"}) and any of ``APP_ARGS``; deployment options come from the config file's
    ``deployments`` section or ``deployment``'s keywords."""
    if not args.get("models"):
        raise InputError("models: expected a mapping of names to paths, such as {\"demo\": \"models/demo\"}")
    unknown = sorted(set(args) - {"models", *APP_ARGS})
    if unknown:
        raise InputError(f"application args: unknown {unknown}; expected 'models' and {sorted(APP_ARGS)}")
    specs = model_specs([], args["models"], where="application args")
    session = {k: v for k, v in args.items() if k in {f.name for f in dataclasses.fields(SessionDefaults)}}
    replica = {k: v for k, v in args.items() if k in ("batch_wait_timeout_s", "max_body_bytes")}
    restricted = args.get("restricted_header")
    limits = GenerationLimits(args["max_new_tokens"]) if "max_new_tokens" in args else GenerationLimits()
    options = RayServeOptions(tuple(specs), SessionDefaults(**{"threads": 1, **session}), **replica,
                              restricted_header=tuple(restricted) if restricted else None, generation=limits)
    return deployment(options).bind(options)
