"""Bad requests get their 4xx with a JSON error -- never a 500, never a dead server -- over HTTP and gRPC, and are
counted as failures in the metrics."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import struct
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

IDS = {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}


def _body(*inputs: dict, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def _binary(header: dict, blob: bytes, claimed: int | None = None) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text) if claimed is None else claimed)}


_ids_blob = np.array([[1, 2, 3]], dtype=np.int64).tobytes()
_binary_ids = {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "parameters": {"binary_data_size": 24}}

#: (case, method, path, body, headers, expected status, words in the error)
CASES = [
    ("malformed JSON", "POST", "/v2/models/tiny/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not an object", "POST", "/v2/models/tiny/infer", b"[1, 2]", {}, 400, "'inputs' list"),
    ("unknown model", "POST", "/v2/models/nope/infer", _body(IDS), {}, 404, "unknown model 'nope'"),
    ("unknown version", "POST", "/v2/models/tiny/versions/7/infer", _body(IDS), {}, 404, "no version '7'"),
    ("wrong datatype", "POST", "/v2/models/tiny/infer", _body({**IDS, "datatype": "FP32", "data": [1.0, 2.0, 3.0]}),
     {}, 400, "expected INT64"),
    ("unknown datatype", "POST", "/v2/models/tiny/infer", _body({**IDS, "datatype": "INT128"}), {}, 400,
     "not supported"),
    ("data/shape mismatch", "POST", "/v2/models/tiny/infer", _body({**IDS, "shape": [1, 4]}), {}, 400,
     "3 values for shape [1, 4]"),
    ("rank 3", "POST", "/v2/models/tiny/infer", _body({**IDS, "shape": [1, 1, 3]}), {}, 400, "expected [L] or [N, L]"),
    ("booleans as ids", "POST", "/v2/models/tiny/infer", _body({**IDS, "data": [True, False, True]}), {}, 400,
     "booleans"),
    ("id out of vocabulary", "POST", "/v2/models/tiny/infer", _body({**IDS, "data": [1, 2, 9999]}), {}, 400,
     "[0, 257]"),
    ("empty sequence", "POST", "/v2/models/tiny/infer", _body({**IDS, "shape": [1, 0], "data": []}), {}, 400,
     "empty"),
    ("over the maximum length", "POST", "/v2/models/tiny/infer",
     *_binary({"inputs": [{**_binary_ids, "shape": [1, 2049], "parameters": {"binary_data_size": 2049 * 8}}]},
              np.ones((1, 2049), np.int64).tobytes()), 400, "at most 2,048"),
    ("header length past the body", "POST", "/v2/models/tiny/infer",
     *_binary({"inputs": [_binary_ids]}, _ids_blob, claimed=10_000), 400, "Inference-Header-Content-Length"),
    ("binary size past the data", "POST", "/v2/models/tiny/infer",
     *_binary({"inputs": [{**_binary_ids, "parameters": {"binary_data_size": 48}}]}, _ids_blob), 400,
     "binary_data_size"),
    ("unclaimed binary bytes", "POST", "/v2/models/tiny/infer",
     *_binary({"inputs": [_binary_ids]}, _ids_blob + b"\0" * 8), 400, "not claimed"),
    ("binary size not the shape's", "POST", "/v2/models/tiny/infer",
     *_binary({"inputs": [{**_binary_ids, "parameters": {"binary_data_size": 16}}]}, _ids_blob[:16]), 400,
     "expected 24"),
    ("unknown output", "POST", "/v2/models/tiny/infer", _body(IDS, outputs=[{"name": "attention_weights"}]), {}, 400,
     "unknown output"),
    ("output of another head", "POST", "/v2/models/tiny/infer", _body(IDS, outputs=[{"name": "probabilities"}]), {},
     400, "needs class_logits"),
    ("unknown input", "POST", "/v2/models/tiny/infer", _body(IDS, {**IDS, "name": "pixels"}), {}, 400,
     "not inputs of model"),
    ("no inputs", "POST", "/v2/models/tiny/infer", _body(), {}, 400, "none given"),
    ("mask not 0/1", "POST", "/v2/models/tiny/infer",
     _body(IDS, {**IDS, "name": "attention_mask", "data": [1, 2, 0]}), {}, 400, "other than 0 and 1"),
    ("mask with a gap", "POST", "/v2/models/tiny/infer",
     _body(IDS, {**IDS, "name": "attention_mask", "data": [1, 0, 1]}), {}, 400, "ones must come first"),
    ("text and ids", "POST", "/v2/models/tiny/infer",
     _body(IDS, {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}), {}, 400, "not both"),
    ("bad top_k", "POST", "/v2/models/tiny/infer", _body(IDS, parameters={"top_k": 0}), {}, 400, "top_k"),
    ("bad pooling", "POST", "/v2/models/tiny/infer", _body(IDS, parameters={"pooling": "max"}), {}, 400,
     "pooling"),
    ("classification", "POST", "/v2/models/tiny/infer",
     _body(IDS, outputs=[{"name": "logits", "parameters": {"classification": 2}}]), {}, 400, "classification"),
    ("body over the cap", "POST", "/v2/models/tiny/infer", b"{" + b" " * (1 << 20) + b"}", {}, 413, "over 1,048,576"),
    ("unknown route", "GET", "/v3/everything", b"", {}, 404, "Not Found"),
    ("wrong method", "GET", "/v2/models/tiny/infer", b"", {}, 405, "Method Not Allowed"),
]


def _request(server, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=60)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        return response.status, dict(response.getheaders()), json.loads(payload) if payload else {}
    finally:
        connection.close()


def _failures(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics").read().decode()
    return sum(float(v) for v in re.findall(r'nv_inference_request_failure\{model="tiny",reason="OTHER",'
                                            r'version="1"\} (\S+)', text))


def test_bad_http_requests_get_their_4xx_and_the_server_stays_healthy(server) -> None:
    assert len(CASES) >= 12
    before = _failures(server)
    for case, method, path, body, headers, status, words in CASES:
        got, _, payload = _request(server, method, path, body, headers)
        assert got == status, f"{case}: HTTP {got} {payload}"
        assert set(payload) == {"error"} and words in payload["error"], f"{case}: {payload}"
    # counted: the infer requests that reached a model and were refused as bad (not 404s, 413s or routing)
    counted = sum(1 for _, _, path, _, _, status, _ in CASES if status == 400 and "/models/tiny/infer" in path)
    assert _failures(server) - before == counted
    status, _, payload = _request(server, "POST", "/v2/models/tiny/infer", _body(IDS), {})
    assert status == 200 and payload["outputs"][0]["shape"] == [1, 3, 258]
    assert _request(server, "GET", "/v2/health/ready", b"", {})[0] == 200


def test_gzip_request_body_is_accepted(server) -> None:
    status, _, payload = _request(server, "POST", "/v2/models/tiny/infer", gzip.compress(_body(IDS)),
                                  {"Content-Encoding": "gzip"})
    assert status == 200 and payload["outputs"][0]["name"] == "logits"


def test_bytes_input_that_is_not_utf8_is_a_bad_request(server) -> None:
    blob = struct.pack("<I", 2) + b"\xff\xfe"
    body, headers = _binary({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(blob)}}]}, blob)
    status, _, payload = _request(server, "POST", "/v2/models/tiny/infer", body, headers)
    assert status == 400 and "not UTF-8" in payload["error"]


def test_grpc_errors_map_to_status_codes(server) -> None:
    client = grpcclient.InferenceServerClient(server.grpc)
    ids = grpcclient.InferInput("input_ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [ids])
    assert unknown.value.status() == str(grpc.StatusCode.NOT_FOUND) and "unknown model" in unknown.value.message()
    floats = grpcclient.InferInput("input_ids", [1, 3], "FP32")
    floats.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong:
        client.infer("tiny", [floats])
    assert wrong.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT) and "INT64" in wrong.value.message()
    with pytest.raises(InferenceServerException) as output:
        client.infer("tiny", [ids], outputs=[grpcclient.InferRequestedOutput("nothing")])
    assert output.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert client.is_server_ready()
