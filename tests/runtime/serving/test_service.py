"""The model service in process, under the runner of Triton's Python backend (``GatherRunner``): the requests of one
``execute`` share one forward plan, each answered as by ``reformer-rt serve``, a bad one failing alone; a service
answers nothing before its warm-up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from helpers.serving import ragged_sequences

from reformer_rt.models import InputError
from reformer_rt.runtime import Session
from reformer_rt.runtime.serving.model import ServedModel
from reformer_rt.runtime.serving.protocol import InferRequest, Unavailable
from reformer_rt.runtime.serving.service import ModelService
from reformer_rt.runtime.serving.triton_python import GatherRunner


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> ServedModel:
    return ServedModel("tiny", Session(tiny_checkpoint, backend="torch", device="cpu"))


def _request(ids: np.ndarray, outputs: list[str]) -> InferRequest:
    return InferRequest("tiny", "", "", {"input_ids": ids[None]}, {name: False for name in outputs}, {}, False)


def test_gathered_requests_share_one_plan_and_fail_alone(model: ServedModel, monkeypatch) -> None:
    runner = GatherRunner(model)
    service = ModelService(model, runner)
    plans = []
    run_jobs = model.session.run_jobs
    monkeypatch.setattr(model.session, "run_jobs", lambda jobs: plans.append(len(jobs)) or run_jobs(jobs))
    sequences = ragged_sequences(3, seed=4, low=5, high=120)

    async def main() -> list[object]:
        await service.warm_up()
        plans.clear()
        requests = [_request(sequences[0], ["last_logits"]), _request(sequences[1], ["no_such_output"]),
                    _request(sequences[2], ["last_logits", "embedding"])]
        tasks = [asyncio.ensure_future(service.infer(lambda r=r: r)) for r in requests]
        while runner.gathered + sum(t.done() for t in tasks) < len(tasks):
            await asyncio.sleep(0)
        runner.run_gathered()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, bad, third = asyncio.run(main())
    assert plans == [2]  # the two valid requests' sequences, planned together once
    assert isinstance(bad, InputError) and "no_such_output" in str(bad)
    alone = model.session.run([sequences[0], sequences[2]], outputs=["last_logits", "embedding"])
    got = {name: array for name, array, _ in first.outputs}
    assert np.abs(got["last_logits"] - alone["last_logits"][0]).max() <= 1e-5
    got = {name: array for name, array, _ in third.outputs}
    assert np.abs(got["embedding"] - alone["embedding"][1]).max() <= 1e-5


def test_a_service_answers_only_after_its_warm_up(model: ServedModel) -> None:
    service = ModelService(model, GatherRunner(model))

    async def main() -> None:
        with pytest.raises(Unavailable, match="not ready"):
            await service.infer(lambda: _request(np.arange(5), ["last_logits"]))
        await service.warm_up()
        assert service.ready

    asyncio.run(main())
