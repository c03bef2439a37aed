"""The inference server: models, their schedulers, the HTTP/REST, gRPC and metrics listeners, and their lifecycle.

``InferenceServer(models, options)`` holds one ``ServedModel`` + ``Scheduler`` per model; ``infer`` is the one
path every transport takes (look up the model, check it is ready, parse, queue, respond, count). Lifecycle:
``start`` registers metrics, starts the schedulers, warms every model up on its worker thread (so the first
request does not pay for allocation and kernel selection), then opens the listeners and only then reports
ready; ``stop`` (SIGTERM / SIGINT) reports not ready, refuses new requests with 503, lets every accepted request
finish (up to ``drain_timeout_s``), then closes the listeners.

Access control (optional): a required header ``(name, value)`` on every endpoint but the health checks, compared
in constant time; missing -> 401, wrong -> 403; its value is never logged. TLS: one certificate and key for the
HTTP, gRPC and metrics listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from reformer_rt.export.metadata import package_version

from ..generation import TokenEvent
from . import generating
from .metrics import Metrics
from .model import ServedModel
from .protocol import InferRequest, InferResponse, ServingError, Unavailable, error_status
from .routes import check_restricted, find_slot, repository_index
from .scheduler import Scheduler, SchedulerOptions

log = logging.getLogger("reformer_rt.serve")

SERVER_NAME = "reformer-rt"
EXTENSIONS = ("binary_tensor_data", "model_repository", "statistics")
DEFAULT_MAX_BODY = 64 << 20  # Triton's default HTTP input cap
#: Tokens of the warm-up request: two chunks of the longest chunk length, so the hashed LSH path runs too.
WARMUP_CHUNKS = 2


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_body_bytes: int = DEFAULT_MAX_BODY
    scheduler: SchedulerOptions = SchedulerOptions()
    restricted_header: tuple[str, str] | None = None  # (name, value) required beyond health checks
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_timeout_s: float = 300.0
    access_log: bool = False


@dataclasses.dataclass(eq=False)
class ModelEntry:
    model: ServedModel
    scheduler: Scheduler
    ready: bool = False


@dataclasses.dataclass
class _Account:
    """What one request contributes to the metrics once it succeeds."""

    started: float
    tokens: int = 0
    queue_us: float = 0.0
    compute_us: float = 0.0


class InferenceServer:
    def __init__(self, models: list[ServedModel], options: ServerOptions) -> None:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ServingError(f"models: names {names} repeat; give each model its own NAME=PATH")
        self.options = options
        self.metrics = Metrics()
        self.models = {m.name: ModelEntry(m, Scheduler(m, options.scheduler, self.metrics)) for m in models}
        self.live = False
        self.ready = False
        self.started_at = time.time()
        self._listeners: list[Any] = []  # objects with a bound ``port`` and an async ``stop()``
        self.ports: dict[str, int] = {}
        self._stopped = asyncio.Event()

    # -------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        from .grpc_api import start_grpc
        from .http_api import start_http, start_metrics

        self.live = True
        for entry in self.models.values():
            self.metrics.register(entry.model)
            entry.scheduler.start()
        for entry in self.models.values():
            await self._warm_up(entry)
        tls = self._tls_context()
        for kind, start in (("http", lambda: start_http(self, tls)), ("grpc", lambda: start_grpc(self)),
                            ("metrics", lambda: start_metrics(self, tls))):
            listener = await start()
            self._listeners.append(listener)  # stop() closes whatever did start
            self.ports[kind] = listener.port
        self.ready = True
        log.info("reformer-rt serve: ready (%s)", ", ".join(sorted(self.models)))

    async def _warm_up(self, entry: ModelEntry) -> None:
        session = entry.model.session
        length = WARMUP_CHUNKS * max(session.config.lsh_attn_chunk_length, session.config.local_attn_chunk_length)
        length = min(length, session.max_length)
        started = time.perf_counter()
        await entry.scheduler.run_in_worker(lambda: session.run([[0] * length], outputs=list(session.outputs)))
        entry.ready = True
        log.info("reformer-rt serve: model %s warmed up (%d tokens, %.2f s)", entry.model.name, length,
                 time.perf_counter() - started)

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.options.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.options.tls_cert), str(self.options.tls_key))
        return context

    async def stop(self) -> None:
        """Drain: refuse new requests, finish accepted ones (up to the drain timeout), close the listeners."""
        self.ready = False
        log.info("reformer-rt serve: draining (%d requests pending)",
                 sum(e.scheduler.pending_requests for e in self.models.values()))
        drains = [entry.scheduler.drain() for entry in self.models.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*drains), timeout=self.options.drain_timeout_s)
        except TimeoutError:
            log.warning("reformer-rt serve: drain timed out after %.0f s; closing with requests in flight",
                        self.options.drain_timeout_s)
        for listener in reversed(self._listeners):
            await listener.stop()
        for entry in self.models.values():
            await entry.scheduler.close()
        self.live = False
        self._stopped.set()
        log.info("reformer-rt serve: stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -------------------------------------------------------------------------------------------- requests
    def check_access(self, headers: Mapping[str, str]) -> None:
        check_restricted(headers, self.options.restricted_header)

    def entry(self, name: str, version: str = "") -> ModelEntry:
        return find_slot(self.models, name, version)

    async def infer(self, model_name: str, model_version: str, decode: Callable[[], InferRequest]) -> InferResponse:
        """One request, any transport: ``decode`` turns the transport's message into an ``InferRequest`` inside the
        accounting, so a malformed request to a known model counts as its failure. A request for generated outputs
        decodes on the model's worker (``generating.py``). Returns the response, or raises for
        ``protocol.error_status`` (the transport logs the internal errors)."""
        entry = self._ready_entry(model_name, model_version)
        async with self._accounted(entry) as account:
            request = decode()
            generate = generating.parse_infer(entry.model, request)
            if generate is not None:
                tokens, _ = await generating.collect(entry.model, generate, entry.scheduler.iterate)
                account.tokens = sum(len(p) for p in generate.prompts)
                return generating.infer_response(entry.model, request, generate, tokens)
            parsed = entry.model.parse(request, self.options.scheduler.default_priority)
            done = await entry.scheduler.submit(parsed)
            account.tokens, account.queue_us, account.compute_us = parsed.tokens, done.queue_us, done.compute_us
            return entry.model.respond(request, parsed, done.rows)

    async def generate(self, model_name: str, model_version: str, body: bytes) -> dict[str, Any]:
        """Triton's generate extension, whole answer (``generating.py``)."""
        entry = self._ready_entry(model_name, model_version)
        async with self._accounted(entry) as account:
            request = generating.parse_json(entry.model, body)
            account.tokens = sum(len(p) for p in request.prompts)
            tokens, reasons = await generating.collect(entry.model, request, entry.scheduler.iterate)
            return generating.json_answer(entry.model, request, tokens, reasons)

    async def generate_stream(self, model_name: str, model_version: str, request: generating.GenerateRequest | bytes
                              ) -> AsyncIterator[tuple[TokenEvent, str]]:
        """Each new token and its text piece as it is chosen: the generate extension's stream (``bytes``: its JSON
        body) or a gRPC stream (a parsed request)."""
        entry = self._ready_entry(model_name, model_version)
        async with self._accounted(entry) as account:
            if isinstance(request, bytes):
                request = generating.parse_json(entry.model, request)
            account.tokens = sum(len(p) for p in request.prompts)
            text = generating.TextDelta(entry.model, len(request.prompts))
            async for event in generating.stream(entry.model, request, entry.scheduler.iterate):
                yield event, text.add(event)

    def _ready_entry(self, model_name: str, model_version: str) -> ModelEntry:
        entry = self.entry(model_name, model_version)
        if not entry.ready:
            raise Unavailable(f"model {entry.model.name!r} is not ready yet; retry shortly", retry_after_s=1.0)
        return entry

    @contextlib.asynccontextmanager
    async def _accounted(self, entry: ModelEntry) -> AsyncIterator[_Account]:
        """Success or failure of one request in the metrics, with what the body filled in."""
        account = _Account(time.monotonic())
        try:
            yield account
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.record_failure(entry.model, "CANCELED")
            raise
        except Exception as exc:
            status = error_status(exc)
            reason = "REJECTED" if isinstance(exc, Unavailable) else "BACKEND" if status.internal else "OTHER"
            self.metrics.record_failure(entry.model, reason)
            raise
        self.metrics.record_success(entry.model, account.tokens, time.monotonic() - account.started,
                                    account.queue_us, account.compute_us)

    # ---------------------------------------------------------------------------------------- descriptions
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": package_version(), "extensions": list(EXTENSIONS)}

    def repository_index(self) -> list[dict[str, str]]:
        return repository_index(self.models)

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Per-model counters in the shape of Triton's statistics extension (counts and cumulative ns)."""
        entries = [self.entry(name, version)] if name else list(self.models.values())
        return [self.metrics.statistics(e.model) for e in entries]
