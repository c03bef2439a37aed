"""Dynamic batching across requests that keeps the batching contract: each sequence's result equals that sequence
run alone, whatever else shares its forward pass.

Requests (each one or more sequences) queue per model. The dispatcher forms one micro-batch at a time by the rules
of ``runtime/batching.py``: it takes the best queued sequence -- lowest ``priority`` value, then earliest -- and
fills its length bucket with the next best sequences of the SAME bucket, up to ``max_tokens_per_batch`` padded
tokens. A batch that is not full waits at most ``max_queue_delay_us`` (counted from its oldest sequence's arrival)
for more. The batch runs on the model's one worker thread (``Session.run_batch``, then each request's own outputs
are reduced there too), so the event loop -- health, metrics, other models -- stays responsive during a long
forward pass, and the next batch forms while this one runs. With ``batching=False`` a micro-batch holds the
sequences of one request only.

A request that waits longer than its ``timeout`` (microseconds) before its first sequence runs fails with 503; a
full queue (``max_queue_size`` requests) rejects new ones with 503 and Retry-After; a cancelled request's queued
sequences are dropped; an error in a batch fails the requests in that batch and nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import numpy as np

from ..batching import DEFAULT_MAX_TOKENS, bucket_length, run_length, sequences_per_batch
from ..outputs import SequenceJob
from .metrics import Metrics
from .model import ParsedRequest, ServedModel
from .protocol import Unavailable
from .service import Completed, Rows

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SchedulerOptions:
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024  # requests waiting (not yet fully dispatched)
    default_priority: int = 10  # the level of requests that give none (priority 0)
    batching: bool = True


@dataclasses.dataclass(eq=False)
class _Job:
    parsed: ParsedRequest
    jobs: list[SequenceJob]  # one per sequence
    future: asyncio.Future
    arrival: float
    deadline: float | None
    rows: Rows
    waiting: int  # sequences not yet dispatched
    running: int = 0  # sequences dispatched, not finished
    started: float | None = None  # when its first sequence was dispatched
    compute_us: float = 0.0

    @property
    def finished(self) -> bool:
        return self.future.done()


@dataclasses.dataclass(eq=False)
class _Item:
    key: tuple[int, int, int]  # (priority, arrival order, sequence index): lower runs first
    job: _Job
    index: int
    bucket: int

    @property
    def length(self) -> int:
        return len(self.job.parsed.sequences[self.index])


class Scheduler:
    """The ``Runner`` of ``reformer-rt serve`` (``service.py``): one queue and one worker thread per model."""

    def __init__(self, model: ServedModel, options: SchedulerOptions, metrics: Metrics) -> None:
        self.model, self.options, self.metrics = model, options, metrics
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"reformer-rt-{model.name}")
        self._queue: dict[int, list[_Item]] = {}  # bucket -> items, unordered
        self._jobs: set[_Job] = set()  # waiting or running
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._iterations = 0  # generations (``iterate``) running or waiting for the worker
        self._task: asyncio.Task | None = None
        self.accepting = True

    # ------------------------------------------------------------------------------------------------ public
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._dispatch_forever(), name=f"dispatch-{self.model.name}")

    @property
    def pending_requests(self) -> int:
        return sum(1 for job in self._jobs if job.waiting)

    async def forward(self, parsed: ParsedRequest) -> Completed:
        """Queue ``parsed`` and wait for its rows (one list per output, one array per sequence)."""
        if not self.accepting:
            raise Unavailable(f"model {self.model.name!r}: the server is shutting down; retry on another replica")
        if self.pending_requests >= self.options.max_queue_size:
            raise Unavailable(f"model {self.model.name!r}: queue full ({self.options.max_queue_size} requests "
                              "waiting); retry later", retry_after_s=1.0)
        now = time.monotonic()
        deadline = None if parsed.timeout_us is None else now + parsed.timeout_us / 1e6
        job = _Job(parsed, parsed.jobs(), asyncio.get_running_loop().create_future(), now, deadline,
                   {kind.name: [np.empty(0)] * len(parsed.sequences) for kind in parsed.kinds},
                   waiting=len(parsed.sequences))
        order, priority = next(self._order), parsed.priority or self.options.default_priority
        for index, seq in enumerate(parsed.sequences):
            bucket = bucket_length(self.model.session.config, len(seq))
            self._queue.setdefault(bucket, []).append(_Item((priority, order, index), job, index, bucket))
        self._jobs.add(job)
        self._idle.clear()
        self.metrics.set_pending(self.model, self.pending_requests)
        self._wakeup.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            if not job.future.done():
                job.future.cancel()  # its queued sequences are dropped; a running batch finishes unobserved
                self._forget(job)
            raise

    async def iterate(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """The items of ``make()`` -- a generation -- produced on the worker thread one at a time, forward passes of
        other requests running between them; counted as in flight for the drain."""
        if not self.accepting:
            raise Unavailable(f"model {self.model.name!r}: the server is shutting down; retry on another replica")
        self._iterations += 1
        self._idle.clear()
        try:
            async for item in iterate_in_worker(self._executor, make):
                yield item
        finally:
            self._iterations -= 1
            self._maybe_idle()

    async def drain(self) -> None:
        """Stop accepting; return when every accepted request has finished."""
        self.accepting = False
        await self._idle.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this model's worker thread (the warm-up: the Session is only ever used there)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ---------------------------------------------------------------------------------------------- dispatch
    async def _dispatch_forever(self) -> None:
        while True:
            wait = self._expire_and_wait_time()
            if wait != 0.0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except TimeoutError:
                    pass
                continue
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    def _expire_and_wait_time(self) -> float | None:
        """Fail timed-out requests, drop finished ones' items; 0.0 when a batch should be formed now, else how long
        to sleep (None: until woken)."""
        now = time.monotonic()
        for job in [j for j in self._jobs if j.deadline is not None and j.started is None and j.deadline <= now]:
            waited_us = int((now - job.arrival) * 1e6)
            self._fail(job, Unavailable(f"model {self.model.name!r}: request timed out after {waited_us} us in the "
                                        f"queue (timeout {job.parsed.timeout_us} us)"))
        for bucket in list(self._queue):
            self._queue[bucket] = [item for item in self._queue[bucket] if not item.job.finished]
            if not self._queue[bucket]:
                del self._queue[bucket]
        if not self._queue:
            return None
        best = min((item for items in self._queue.values() for item in items), key=lambda item: item.key)
        candidates = self._candidates(best)
        chosen = self._fill(candidates)
        full = len(chosen) < len(candidates) or self._tokens(chosen) >= self.options.max_tokens_per_batch
        oldest = min(item.job.arrival for item in chosen)
        remaining = oldest + self.options.max_queue_delay_us / 1e6 - now
        deadlines = [j.deadline - now for j in self._jobs if j.deadline is not None and j.started is None]
        if full or remaining <= 0 or not self.options.batching:
            return 0.0
        return max(0.0, min([remaining, *deadlines]))

    def _candidates(self, best: _Item) -> list[_Item]:
        items = self._queue[best.bucket]
        if not self.options.batching:
            items = [item for item in items if item.job is best.job]
        return sorted(items, key=lambda item: item.key)

    def _fill(self, candidates: list[_Item]) -> list[_Item]:
        """The longest prefix of ``candidates`` (one bucket) within the token budget (at least one)."""
        chosen, longest = [candidates[0]], candidates[0].length
        for item in candidates[1:]:
            longest = max(longest, item.length)  # one bucket: its run length is that of its longest member
            length = run_length(self.model.session.config, [longest])
            if len(chosen) + 1 > sequences_per_batch(length, self.options.max_tokens_per_batch):
                break
            chosen.append(item)
        return chosen

    def _tokens(self, items: list[_Item]) -> int:
        return len(items) * run_length(self.model.session.config, [item.length for item in items])

    def _take_batch(self) -> list[_Item]:
        if not self._queue:
            return []
        best = min((item for items in self._queue.values() for item in items), key=lambda item: item.key)
        chosen = self._fill(self._candidates(best))
        taken = {id(item) for item in chosen}
        self._queue[best.bucket] = [item for item in self._queue[best.bucket] if id(item) not in taken]
        if not self._queue[best.bucket]:
            del self._queue[best.bucket]
        now = time.monotonic()
        for item in chosen:
            job = item.job
            if job.started is None:
                job.started = now
            job.waiting -= 1
            job.running += 1
        self.metrics.set_pending(self.model, self.pending_requests)
        return chosen

    async def _execute(self, batch: list[_Item]) -> None:
        length = run_length(self.model.session.config, [item.length for item in batch])
        start = time.monotonic()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._compute, batch, length)
        except Exception as exc:  # the batch's requests fail (the server logs why); everything else goes on
            for job in _jobs_of(batch):
                self._fail(job, exc)
            return
        compute_us = (time.monotonic() - start) * 1e6
        self.metrics.record_batch(self.model, len(batch), length, sum(item.length for item in batch))
        for item, rows in zip(batch, results):
            item.job.running -= 1
            for name, value in rows.items():
                item.job.rows[name][item.index] = value
        for job in _jobs_of(batch):
            if job.finished:
                continue
            job.compute_us += compute_us
            if job.waiting == 0 and job.running == 0:
                assert job.started is not None
                job.future.set_result(Completed(job.rows, (job.started - job.arrival) * 1e6, job.compute_us))
                self._forget(job)

    def _compute(self, batch: list[_Item], length: int) -> list[dict[str, np.ndarray]]:
        """On the worker thread: one forward pass, then each sequence's requested outputs."""
        return self.model.session.run_micro_batch([item.job.jobs[item.index] for item in batch], length)

    # ----------------------------------------------------------------------------------------------- outcomes
    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        self._jobs.discard(job)
        self.metrics.set_pending(self.model, self.pending_requests)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._jobs and not self._iterations:
            self._idle.set()


def _jobs_of(batch: list[_Item]) -> list[_Job]:
    """The distinct requests of a batch, in batch order."""
    return list({id(item.job): item.job for item in batch}.values())


async def iterate_in_worker(executor: concurrent.futures.Executor, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """The items of ``make()`` as they come, each produced by its own task on ``executor`` -- a one-thread
    executor then runs other work (forward passes of other requests) between two items. Closing the async
    iterator (a client that went away) closes ``make()``'s iterator on the executor, after the item in progress."""
    loop = asyncio.get_running_loop()
    iterator = await loop.run_in_executor(executor, lambda: iter(make()))
    done = object()
    try:
        while True:
            item = await loop.run_in_executor(executor, next, iterator, done)
            if item is done:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await asyncio.shield(loop.run_in_executor(executor, close))
