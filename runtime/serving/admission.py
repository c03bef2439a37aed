"""Admission by predicted memory: a served request runs only while the memory its forward passes are predicted to
need (``runtime/memory.py``, the same prediction ``Session.run`` refuses by) fits what the server may still take.

One ``MemoryAdmission`` per server, shared by its models: its ``budget`` is what the process could still take when
it started (``memory.available``: the cgroup's free memory, MemAvailable, ``$REFORMER_RT_MEMORY_LIMIT``), after
every model's Session opened. A request whose own need exceeds the whole budget can never run: the service answers
413 / RESOURCE_EXHAUSTED with the Session's refusal (what fits, what lowers the need). Others are admitted while the
needs of the admitted ones add up within the budget and wait, in arrival order, otherwise -- a request's outputs stay
in memory until its response is written, so the needs of requests queued at the scheduler add up as they wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..memory import available, memory_cap


class MemoryAdmission:
    def __init__(self, budget: int, source: str) -> None:
        self.budget, self.source = budget, source
        self.in_use = 0
        self._changed = asyncio.Condition()

    @classmethod
    def here(cls) -> MemoryAdmission:
        """The budget of this process now (``memory.available``, with ``$REFORMER_RT_MEMORY_LIMIT`` read once)."""
        return cls(*available(memory_cap()))

    @contextlib.asynccontextmanager
    async def admitted(self, need: int) -> AsyncIterator[None]:
        """Within: ``need`` bytes of the budget are this request's; waits until they are free (``need`` must be at
        most the budget: the caller refuses larger ones)."""
        assert need <= self.budget, f"need {need} over the whole budget {self.budget}: refuse it instead"
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use + need <= self.budget)
            self.in_use += need
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= need
                self._changed.notify_all()
