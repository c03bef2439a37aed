"""One model as a service: every request a KServe v2 model answers, written once for every host.

``ModelService(model, runner, metrics)`` owns, for one ``ServedModel``: readiness, metadata and Triton model config,
the warm-up, ``infer`` (v2 infer, including the generated outputs), ``generate`` and ``generate_stream`` (the
generate extension and the gRPC token stream). What differs between hosts is only how work reaches the model's
Session, the ``Runner``:

* ``Scheduler`` (``reformer-rt serve``): a queue per model, length-bucketed micro-batches across requests, one
  worker thread;
* ``RayRunner`` (a Ray Serve replica, ``ray_serve.py``): ``@serve.batch`` collects sequences across requests;
* ``GatherRunner`` (Triton's Python backend, ``triton_python.py``): the requests of one ``execute`` call are parsed
  first, then every sequence runs in one ``Session.run_jobs``.

Hosts keep lifecycle, access control and listeners; transports (``http_api``, ``grpc_api``, ``ray_serve``) find the
service by name through their host (``host.py``) and call it. With ``metrics``, every request is counted once,
success or failure with its reason, as Triton counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from . import generating
from .admission import MemoryAdmission
from .model import ParsedRequest, ServedModel
from .protocol import InferRequest, InferResponse, PayloadTooLarge, Unavailable, error_status

if TYPE_CHECKING:  # prometheus_client is the serve extra's; Triton's Python backend runs services without it
    from .metrics import Metrics

log = logging.getLogger("reformer_rt.serve")

T = TypeVar("T")
Rows = dict[str, list[np.ndarray]]
#: Tokens of the warm-up request, in chunks of the longest chunk length: two, so the hashed LSH path runs too.
WARMUP_CHUNKS = 2


@dataclasses.dataclass(frozen=True)
class Completed:
    """A request's forward outputs: its rows (one list per output, one array per sequence) and where its time went
    (microseconds)."""

    rows: Rows
    queue_us: float = 0.0  # arrival to its first sequence's dispatch
    compute_us: float = 0.0  # the forward passes its sequences ran in (a batch counts for each request in it)


class Runner(Protocol):
    """How a host runs work on one model's Session."""

    async def forward(self, parsed: ParsedRequest) -> Completed:
        """The outputs ``parsed`` asks for, each sequence's equal to that sequence run alone."""
        ...

    def iterate(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """The items of ``make()`` (a generation), produced where the Session runs, one at a time."""
        ...

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` where the Session runs (the warm-up)."""
        ...


@dataclasses.dataclass
class _Account:
    """What one request contributes to the metrics once it succeeds."""

    started: float
    tokens: int = 0
    queue_us: float = 0.0
    compute_us: float = 0.0
    generated: list[list[generating.Generated]] | None = None  # a generation's tokens, per prompt


class ModelService:
    def __init__(self, model: ServedModel, runner: Runner, metrics: Metrics | None = None,
                 limits: generating.GenerationLimits = generating.GenerationLimits(),
                 admission: MemoryAdmission | None = None) -> None:
        self.model, self.runner, self.metrics, self.limits = model, runner, metrics, limits
        self.admission = admission
        self.ready = False

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    def metadata(self) -> dict[str, Any]:
        return self.model.metadata()

    def config(self) -> Any:
        return self.model.config()

    async def warm_up(self) -> None:
        """One request over every output before the model reports ready, so the first client does not pay for
        allocation and kernel selection: ``WARMUP_CHUNKS`` chunks of the longest chunk length (within the
        model's maximum length)."""
        session = self.model.session
        chunk = max(session.config.lsh_attn_chunk_length, session.config.local_attn_chunk_length)
        length = min(WARMUP_CHUNKS * chunk, session.max_length)
        started = time.perf_counter()
        await self.runner.call(lambda: session.run([[0] * length], outputs=list(session.outputs)))
        self.ready = True
        log.info("reformer-rt serve: model %s warmed up (%d tokens, %.2f s)", self.name, length,
                 time.perf_counter() - started)

    # ------------------------------------------------------------------------------------------------ requests
    async def infer(self, decode: Callable[[], InferRequest]) -> InferResponse:
        """One v2 infer request: ``decode`` turns the transport's message into an ``InferRequest`` inside the
        accounting, so a malformed request to a known model counts as its failure. A request for generated
        outputs decodes new tokens (``generating.py``). Returns the response, or raises for
        ``protocol.error_status``."""
        self._check_ready()
        async with self._accounted() as account:
            request = decode()
            generate = generating.parse_infer(self.model, request, self.limits)
            if generate is not None:
                account.tokens = sum(len(p) for p in generate.prompts)
                account.generated = await generating.collect(self.model, generate, self.runner.iterate)
                return generating.infer_response(self.model, request, generate, account.generated)
            parsed = self.model.parse(request)
            async with self._admitted(parsed):
                done = await self.runner.forward(parsed)
            account.tokens, account.queue_us, account.compute_us = parsed.tokens, done.queue_us, done.compute_us
            return self.model.respond(request, parsed, done.rows)

    async def generate(self, body: bytes) -> dict[str, Any]:
        """The generate extension, whole answer (``generating.py``)."""
        self._check_ready()
        async with self._accounted() as account:
            request = generating.parse_json(self.model, body, self.limits)
            account.tokens = sum(len(p) for p in request.prompts)
            account.generated = await generating.collect(self.model, request, self.runner.iterate)
            return generating.json_answer(self.model, request, account.generated)

    def parse_generation(self, request: InferRequest) -> generating.GenerateRequest | None:
        """A v2 infer request that asks for generated outputs, checked against this host's limits (None: it asks
        for none)."""
        return generating.parse_infer(self.model, request, self.limits)

    async def generate_stream(self, request: generating.GenerateRequest | bytes) -> AsyncIterator[generating.Generated]:
        """Each new token and its text as it is chosen: the generate extension's stream (``bytes``: its JSON body)
        or a gRPC stream (a request from ``parse_generation``)."""
        self._check_ready()
        async with self._accounted() as account:
            if isinstance(request, bytes):
                request = generating.parse_json(self.model, request, self.limits)
            account.tokens = sum(len(p) for p in request.prompts)
            account.generated = [[] for _ in request.prompts]
            async for generated in generating.stream(self.model, request, self.runner.iterate):
                account.generated[generated.event.prompt].append(generated)
                yield generated

    def _admitted(self, parsed: ParsedRequest) -> contextlib.AbstractAsyncContextManager[None]:
        """The request's share of the memory budget (``admission.py``), or a 413 naming what fits when it can never
        have it; no budget without an admission (hosts other than ``reformer-rt serve``)."""
        if self.admission is None:
            return contextlib.nullcontext()
        session, names = self.model.session, [kind.name for kind in parsed.kinds]
        lengths = [len(seq) for seq in parsed.sequences]
        need = session.memory_footprint(lengths, parsed.kinds, names).working  # once per request; refusals explain
        if need > self.admission.budget:
            refusal = session.memory_refusal(lengths, parsed.kinds, names, self.admission.budget, self.admission.source)
            assert refusal is not None, "the refusal predicts what the admission predicted"
            raise PayloadTooLarge(refusal)
        return self.admission.admitted(need)

    def _check_ready(self) -> None:
        if not self.ready:
            raise Unavailable(f"model {self.name!r} is not ready yet; retry shortly", retry_after_s=1.0)

    @contextlib.asynccontextmanager
    async def _accounted(self) -> AsyncIterator[_Account]:
        """Success or failure of one request in the metrics (when there are any), with what the body filled in."""
        account = _Account(time.monotonic())
        if self.metrics is None:
            yield account
            return
        try:
            yield account
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.record_failure(self.model, "CANCELED")
            raise
        except Exception as exc:
            status = error_status(exc)
            reason = "REJECTED" if isinstance(exc, Unavailable) else "BACKEND" if status.internal else "OTHER"
            self.metrics.record_failure(self.model, reason)
            raise
        if account.generated is not None:  # one forward pass per step: the longest prompt's new tokens
            self.metrics.record_generation(self.model, len(account.generated),
                                           max((len(tokens) for tokens in account.generated), default=0))
        self.metrics.record_success(self.model, account.tokens, time.monotonic() - account.started,
                                    account.queue_us, account.compute_us)
