"""The model of a Triton Inference Server Python-backend repository written by ``reformer-rt export --triton-repo``.

Triton loads ``NAME/1/model.py``, which imports ``TritonPythonModel`` from here; ``triton_python_backend_utils``
exists only inside Triton's Python backend stub, so it is imported in the methods Triton calls.

``initialize`` opens a Session on the repository's artifact (``NAME/1/<reformer_rt_artifact>``) with the backend
the config names, on the instance's device (Triton's ``KIND_GPU`` instance N -> ``cuda:N``). ``execute`` receives
every request Triton's dynamic batcher collected (ragged inputs allowed: Triton hands each request over as it came,
never padded or concatenated); each is parsed like a ``reformer-rt serve`` request (same inputs, outputs,
parameters and errors), all their sequences are planned together by the batching contract (``Session.run_jobs``),
and each request gets its own response -- an invalid request its own error, which never fails the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..session import Session
from .model import ServedModel
from .protocol import InferRequest, error_status

ARTIFACT_PARAMETER = "reformer_rt_artifact"
BACKEND_PARAMETER = "reformer_rt_backend"
INPUT_NAMES = ("input_ids", "attention_mask", "text")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        artifact = Path(args["model_repository"]) / args["model_version"] / parameters[ARTIFACT_PARAMETER]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        session = Session(artifact, backend=parameters.get(BACKEND_PARAMETER, "auto"), device=device)
        self.model = ServedModel(config["name"], session, tokenizer_dir=artifact if artifact.is_dir() else None)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        decoded: list[tuple[InferRequest, Any] | BaseException] = []
        for request in requests:
            try:
                infer = self._decode(request, pb_utils)
                decoded.append((infer, self.model.parse(infer, default_priority=0)))
            except Exception as exc:  # this request's own error
                decoded.append(exc)
        jobs = [(i, job) for i, item in enumerate(decoded) if not isinstance(item, BaseException)
                for job in item[1].jobs()]
        try:
            results, _ = self.model.session.run_jobs([job for _, job in jobs])
        except Exception as exc:  # the forward pass failed: every request of this batch gets the error
            return [self._error(pb_utils, exc) for _ in requests]
        per_request: dict[int, list[dict]] = {}
        for (index, _), result in zip(jobs, results):
            per_request.setdefault(index, []).append(result)
        responses = []
        for index, item in enumerate(decoded):
            if isinstance(item, BaseException):
                responses.append(self._error(pb_utils, item))
                continue
            infer, parsed = item
            rows = {kind.name: [r[kind.name] for r in per_request.get(index, [])] for kind in parsed.kinds}
            response = self.model.respond(infer, parsed, rows)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array, _ in response.outputs]))
        return responses

    def _decode(self, request: Any, pb_utils: Any) -> InferRequest:
        inputs = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        outputs = {name: True for name in request.requested_output_names()} or None
        parameters = json.loads(request.parameters() or "{}")
        return InferRequest(self.model.name, self.model.version, request.request_id(), inputs, outputs, parameters,
                            True)

    @staticmethod
    def _error(pb_utils: Any, exc: BaseException) -> Any:
        status = error_status(exc)
        code = pb_utils.TritonError.INVALID_ARG if status.http_status == 400 else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(status.message, code))

    def finalize(self) -> None:
        self.model = None  # type: ignore[assignment]
