"""The model of a Triton Inference Server Python-backend repository written by ``reformer-rt export --triton-repo``.

Triton loads ``NAME/1/model.py``, which imports ``TritonPythonModel`` from here; ``triton_python_backend_utils``
exists only inside Triton's Python backend stub, so it is imported in the methods Triton calls.

``initialize`` opens a Session on the repository's artifact (``NAME/1/<reformer_rt_artifact>``) with the backend
the config names, on the instance's device (Triton's ``KIND_GPU`` instance N -> ``cuda:N``), as a ``ModelService``
(``service.py``: the same parsing, outputs, generation and errors as ``reformer-rt serve``), and warms it up.
``execute`` receives every request Triton's dynamic batcher collected (ragged inputs allowed: Triton hands each
request over as it came, never padded or concatenated); ``GatherRunner`` lets every request parse first, then
plans all their sequences together by the batching contract (one ``Session.run_jobs``), and each request gets its
own response -- an invalid request its own error, which never fails the others.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .model import ParsedRequest, ServedModel
from .protocol import InferRequest, error_status
from .service import Completed, ModelService
from .spec import ModelSpec

T = TypeVar("T")
ARTIFACT_PARAMETER = "reformer_rt_artifact"
BACKEND_PARAMETER = "reformer_rt_backend"
QUANTIZE_PARAMETER = "reformer_rt_quantize"  # "int8" for a checkpoint served in int8 (an int8 export needs none)
INPUT_NAMES = ("input_ids", "attention_mask", "text")


class GatherRunner:
    """The ``Runner`` of one ``execute`` call: ``forward`` only gathers; ``run_gathered`` runs every gathered
    request's sequences in one ``Session.run_jobs`` and answers each. Generations and the warm-up run at once, on
    the calling thread (Triton gives each model instance its own)."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self._gathered: list[tuple[ParsedRequest, asyncio.Future[Completed]]] = []

    @property
    def gathered(self) -> int:
        return len(self._gathered)

    async def forward(self, parsed: ParsedRequest) -> Completed:
        future: asyncio.Future[Completed] = asyncio.get_running_loop().create_future()
        self._gathered.append((parsed, future))
        return await future

    def run_gathered(self) -> None:
        gathered, self._gathered = self._gathered, []
        jobs = [(index, job) for index, (parsed, _) in enumerate(gathered) for job in parsed.jobs()]
        try:
            results, _ = self.model.session.run_jobs([job for _, job in jobs])
        except Exception as exc:  # the forward pass failed: every request of this batch gets the error
            for _, future in gathered:
                future.set_exception(exc)
            return
        per_request: dict[int, list[dict]] = {}
        for (index, _), result in zip(jobs, results):
            per_request.setdefault(index, []).append(result)
        for index, (parsed, future) in enumerate(gathered):
            rows = {kind.name: [r[kind.name] for r in per_request.get(index, [])] for kind in parsed.kinds}
            future.set_result(Completed(rows))

    async def iterate(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        for item in make():
            yield item

    async def call(self, fn: Callable[[], T]) -> T:
        return fn()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        artifact = Path(args["model_repository"]) / args["model_version"] / parameters[ARTIFACT_PARAMETER]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        spec = ModelSpec(config["name"], str(artifact), parameters.get(BACKEND_PARAMETER, "auto"), device,
                         quantize=parameters.get(QUANTIZE_PARAMETER) or None)
        model = ServedModel(spec.name, spec.open(), tokenizer_dir=artifact if artifact.is_dir() else None)
        self.runner = GatherRunner(model)
        self.service = ModelService(model, self.runner)
        self.config_outputs = {output["name"] for output in config.get("output", [])}
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.service.warm_up())

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        return self.loop.run_until_complete(self._execute(requests, pb_utils))

    async def _execute(self, requests: list[Any], pb_utils: Any) -> list[Any]:
        tasks = [asyncio.ensure_future(self.service.infer(lambda r=request: self._decode(r, pb_utils)))
                 for request in requests]
        # Parsing is synchronous: each request soon either waits in the runner or is done (an error, a generation).
        while self.runner.gathered + sum(task.done() for task in tasks) < len(tasks):
            await asyncio.sleep(0)
        self.runner.run_gathered()
        responses = []
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                responses.append(self._error(pb_utils, outcome))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, array) for name, array, _ in outcome.outputs]))
        return responses

    def _decode(self, request: Any, pb_utils: Any) -> InferRequest:
        inputs = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        named = list(request.requested_output_names())
        # Triton hands a request that names no output every output of the config: that is "the model's default"
        outputs = None if not named or set(named) == self.config_outputs else {name: True for name in named}
        parameters = json.loads(request.parameters() or "{}")
        return InferRequest(self.service.name, self.service.version, request.request_id(), inputs, outputs,
                            parameters, True)

    @staticmethod
    def _error(pb_utils: Any, exc: BaseException) -> Any:
        status = error_status(exc)
        code = pb_utils.TritonError.INVALID_ARG if status.http_status == 400 else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(status.message, code))

    def finalize(self) -> None:
        self.loop.close()
        self.service = None  # type: ignore[assignment]
