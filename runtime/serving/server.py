"""The host of ``reformer-rt serve``: one ``ModelService`` per model over a ``Scheduler``, its metrics, access control,
listeners and lifecycle.

``InferenceServer(models, options)`` gives each ``ServedModel`` a scheduler (the service's runner: queue,
micro-batches, worker thread) and a service (``service.py``: every request kind). Its listeners are started by
whoever composes the server (``commands/serve.py``: aiohttp HTTP/REST, grpc.aio, Prometheus metrics), each a
callable that receives the server as its ``Host`` and returns an object with a bound ``port`` and an async
``stop()``. Lifecycle: ``start(listeners)`` registers metrics, starts the schedulers, warms every model up on its
worker thread, then opens the listeners and only then reports ready; ``stop`` (SIGTERM / SIGINT) reports not ready,
refuses new requests with 503, lets every accepted request finish (up to ``drain_timeout_s``), then closes the
listeners.

Access control (optional): a required header ``(name, value)`` on every endpoint but the health checks, compared
in constant time; missing -> 401, wrong -> 403; its value is never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from reformer_rt.export.metadata import package_version

from .admission import MemoryAdmission
from .generating import GenerationLimits
from .host import ListenerOptions, check_restricted, find_service, repository_index
from .metrics import Metrics
from .model import ServedModel
from .protocol import ServingError
from .scheduler import Scheduler, SchedulerOptions
from .service import ModelService

log = logging.getLogger("reformer_rt.serve")

SERVER_NAME = "reformer-rt"
EXTENSIONS = ("binary_tensor_data", "model_repository", "statistics")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    listeners: ListenerOptions = ListenerOptions()
    scheduler: SchedulerOptions = SchedulerOptions()
    restricted_header: tuple[str, str] | None = None  # (name, value) required beyond health checks
    drain_timeout_s: float = 300.0
    generation: GenerationLimits = GenerationLimits()


class Listener(Protocol):
    port: int

    async def stop(self) -> None: ...


#: What ``start`` opens: (kind, a function of the server that starts one listener).
ListenerStart = tuple[str, Callable[["InferenceServer"], Awaitable[Listener]]]


class InferenceServer:
    def __init__(self, models: list[ServedModel], options: ServerOptions,
                 unavailable: Mapping[str, str] | None = None) -> None:
        """``unavailable``: models that failed to load (name -> reason): listed, answered with that reason."""
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ServingError(f"models: names {names} repeat; give each model its own NAME=PATH")
        self.options = options
        self.unavailable = dict(unavailable or {})
        self.metrics = Metrics()
        self.schedulers = {m.name: Scheduler(m, options.scheduler, self.metrics) for m in models}
        #: One memory budget for every model (``admission.py``): what the process may take once they are open.
        self.admission = MemoryAdmission.here()
        self.services = {m.name: ModelService(m, self.schedulers[m.name], self.metrics, options.generation,
                                              self.admission) for m in models}
        self.live = False
        self.ready = False
        self._listeners: list[Listener] = []
        self.ports: dict[str, int] = {}
        self._stopped = asyncio.Event()

    # -------------------------------------------------------------------------------------------- lifecycle
    async def start(self, listeners: Sequence[ListenerStart]) -> None:
        self.live = True
        for name, scheduler in self.schedulers.items():
            self.metrics.register(self.services[name].model)
            scheduler.start()
        for service in self.services.values():
            await service.warm_up()
        for kind, start in listeners:
            listener = await start(self)
            self._listeners.append(listener)  # stop() closes whatever did start
            self.ports[kind] = listener.port
        self.ready = True
        log.info("reformer-rt serve: ready (%s)", ", ".join(sorted(self.services)))

    async def stop(self) -> None:
        """Drain: refuse new requests, finish accepted ones (up to the drain timeout), close the listeners."""
        self.ready = False
        log.info("reformer-rt serve: draining (%d requests pending)",
                 sum(s.pending_requests for s in self.schedulers.values()))
        drains = [scheduler.drain() for scheduler in self.schedulers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*drains), timeout=self.options.drain_timeout_s)
        except TimeoutError:
            log.warning("reformer-rt serve: drain timed out after %.0f s; closing with requests in flight",
                        self.options.drain_timeout_s)
        for listener in reversed(self._listeners):
            await listener.stop()
        for scheduler in self.schedulers.values():
            await scheduler.close()
        self.live = False
        self._stopped.set()
        log.info("reformer-rt serve: stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ------------------------------------------------------------------------------------------------ Host
    def check_access(self, headers: Mapping[str, str]) -> None:
        check_restricted(headers, self.options.restricted_header)

    def service(self, name: str, version: str = "") -> ModelService:
        return find_service(self.services, name, version, self.unavailable)

    def server_metadata(self) -> dict[str, Any]:
        generate = ["generate"] if any(s.model.can_generate for s in self.services.values()) else []
        return {"name": SERVER_NAME, "version": package_version(), "extensions": [*EXTENSIONS, *generate]}

    def repository_index(self) -> list[dict[str, str]]:
        return repository_index(self.services, self.unavailable)

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Per-model counters in the shape of Triton's statistics extension (counts and cumulative ns)."""
        services = [self.service(name, version)] if name else list(self.services.values())
        return [self.metrics.statistics(s.model) for s in services]
