"""``reformer-rt serve`` admits requests by the memory model (``serving/admission.py``): under a budget made small by
``$REFORMER_RT_MEMORY_LIMIT``, a request that can never fit is a 413 carrying the Session's refusal (what fits, what
lowers the need) and the server answers the next request; the admission's budget makes later requests wait until
earlier ones give their share back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests
from helpers.serving import SERVED_LM, ServerProcess

from reformer_rt.runtime import Session
from reformer_rt.runtime.memory import MEMORY_LIMIT_ENV
from reformer_rt.runtime.serving.admission import MemoryAdmission

SMALL, LARGE = 40, 2000


def _body(length: int) -> dict:
    return {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, length], "data": [1] * length}],
            "outputs": [{"name": "logits"}]}


def test_a_request_that_can_never_fit_is_a_413_and_the_server_serves_on(tiny_checkpoint: Path) -> None:
    session = Session(tiny_checkpoint, backend="torch", device="cpu")
    need = {n: session.memory_footprint([n], session.output_kinds(["logits"]), ["logits"]).working
            for n in (SMALL, LARGE)}
    warm_up = session.memory_footprint([2 * SERVED_LM.config.lsh_attn_chunk_length],
                                       session.output_kinds(list(session.outputs)), list(session.outputs)).working
    budget = 2 * max(need[SMALL], warm_up)
    assert budget < need[LARGE]
    with ServerProcess(f"tiny={tiny_checkpoint}", "--backend", "torch", "--device", "cpu",
                       env={MEMORY_LIMIT_ENV: str(budget)}) as server:
        url = f"http://{server.http}/v2/models/tiny/infer"
        refused = requests.post(url, json=_body(LARGE), timeout=60)
        assert refused.status_code == 413
        error = refused.json()["error"]
        assert "memory:" in error and MEMORY_LIMIT_ENV in error and "expected at most" in error
        answered = requests.post(url, json=_body(SMALL), timeout=60)
        assert answered.status_code == 200
        assert answered.json()["outputs"][0]["shape"] == [1, SMALL, SERVED_LM.config.vocab_size]


def test_admission_waits_for_the_budget_in_order() -> None:
    async def scenario() -> list[str]:
        admission, events = MemoryAdmission(100, "a test budget"), []

        async def request(name: str, need: int, hold: float) -> None:
            async with admission.admitted(need):
                events.append(f"{name} in ({admission.in_use})")
                await asyncio.sleep(hold)
            events.append(f"{name} out")

        await asyncio.gather(request("a", 60, 0.05), request("b", 30, 0.01), request("c", 50, 0.0))
        assert admission.in_use == 0
        return events

    events = asyncio.run(scenario())
    assert events.index("c in (50)") > events.index("a out")  # 60 + 30 + 50 > 100: c waited for a
    assert events.index("b in (90)") < events.index("a out")  # a and b fit together
