"""The v2 codec against tritonclient's own encoders and decoders: what the client writes, we read; what we write,
the client reads -- JSON and binary, every datatype we use, BYTES included; and the error -> status mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.http import InferResult

from reformer_rt.models import InputError
from reformer_rt.runtime.serving.protocol import (
    BadRequest, InferResponse, NotFound, Unavailable, decode_grpc_request, decode_http_request, encode_grpc_response,
    encode_http_response, error_status,
)

ARRAYS = {
    "ids": np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int64),
    "f32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    "f16": np.array([0.5, -2.25], dtype=np.float16),
    "flags": np.array([True, False, True]),
    "text": np.array([b"h\xc3\xa9llo", b"", b"x" * 300], dtype=object),
}
DATATYPES = {"ids": "INT64", "f32": "FP32", "f16": "FP16", "flags": "BOOL", "text": "BYTES"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_request_written_by_tritonclient_decodes_exactly(binary: bool) -> None:
    inputs = []
    for name, array in ARRAYS.items():
        if name == "f16" and not binary:
            continue  # FP16 has no JSON form
        tensor = httpclient.InferInput(name, list(array.shape), DATATYPES[name])
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=False)]
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="r7", parameters={"top_k": 3})
    request = decode_http_request(body, None if header_length is None else str(header_length), "m", "")
    assert request.id == "r7" and request.parameters["top_k"] == 3 and request.outputs == {"logits": False}
    for tensor in inputs:
        got, want = request.inputs[tensor.name()], ARRAYS[tensor.name()]
        assert got.shape == want.shape and (got.dtype == want.dtype or want.dtype == object)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_response_decodes_in_tritonclient(binary: bool) -> None:
    outputs = [(name, array, binary) for name, array in ARRAYS.items() if binary or name != "f16"]
    body, headers = encode_http_response(InferResponse("m", "1", "r1", outputs))
    length = headers.get("Inference-Header-Content-Length")
    result = InferResult.from_response_body(body, header_length=None if length is None else int(length))
    assert result.get_response()["id"] == "r1"
    for name, array, _ in outputs:
        got = result.as_numpy(name)
        if name == "text" and not binary:  # JSON carries BYTES as strings; tritonclient hands them back as str
            array = np.array([item.decode() for item in array], dtype=object)
        assert got.shape == array.shape and np.array_equal(got, array), name


def test_grpc_round_trip_raw_and_typed_contents() -> None:
    ids = grpcclient.InferInput("ids", [2, 3], "INT64")
    ids.set_data_from_numpy(ARRAYS["ids"])
    text = grpcclient.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(ARRAYS["text"])
    raw = service_pb2.ModelInferRequest(model_name="m", id="g", inputs=[ids._get_tensor(), text._get_tensor()],
                                        raw_input_contents=[ids._get_content(), text._get_content()])
    decoded = decode_grpc_request(raw)
    assert np.array_equal(decoded.inputs["ids"], ARRAYS["ids"]) and list(decoded.inputs["text"]) == list(
        ARRAYS["text"])
    typed = service_pb2.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="ids", datatype="INT64", shape=[2, 3])
    tensor.contents.int64_contents.extend(ARRAYS["ids"].reshape(-1).tolist())
    assert np.array_equal(decode_grpc_request(typed).inputs["ids"], ARRAYS["ids"])
    message = encode_grpc_response(InferResponse("m", "1", "g", [(n, a, True) for n, a in ARRAYS.items()]),
                                   service_pb2)
    result = grpcclient.InferResult(message)
    for name, array in ARRAYS.items():
        assert np.array_equal(result.as_numpy(name), array), name


_BYTES_HEADER = b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}'


@pytest.mark.parametrize("body,header,words", [
    (b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [1, 2]}, '
     b'{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}', None, "given twice"),
    (b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [-1], "data": []}]}', None, "non-negative"),
    (b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": ["a", "b"]}]}', None, "INT64"),
    (_BYTES_HEADER + b"\x09\x00\x00\x00ab", str(len(_BYTES_HEADER)), "runs past the data"),
    (b'{"inputs": []}', "abc", "expected the JSON header's size"),
])
def test_malformed_http_bodies_are_bad_requests(body: bytes, header: str | None, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        decode_http_request(body, header, "m", "")


def test_error_status_mapping() -> None:
    assert (error_status(BadRequest("b")).http_status, error_status(BadRequest("b")).grpc_code) == (400,
                                                                                                 "INVALID_ARGUMENT")
    assert error_status(NotFound("n")).http_status == 404
    unavailable = error_status(Unavailable("u", retry_after_s=1.0))
    assert (unavailable.http_status, unavailable.retry_after_s, unavailable.internal) == (503, 1.0, False)
    assert error_status(InputError("i")).http_status == 400  # any project error the user caused
    bug = error_status(KeyError("secret detail"))
    assert bug.http_status == 500 and bug.internal and "secret detail" not in bug.message
    assert json.loads(json.dumps({"error": bug.message}))
