"""Generation through ``reformer-rt serve``: Triton's generate extension (JSON and server-sent events), v2 infer
asking for generated outputs (HTTP and gRPC), and gRPC streaming one response per token -- each equal to
``Session.generate`` on the same prompt; a model that cannot generate, and bad parameters, are 400s."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.runtime import GenerationOptions, Session
from helpers.serving import wait_until

PROMPTS = ["def add(a, b):\n    return", "import os\nimport sys\n\nclass Path"]
NEW = 12


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> Session:
    return Session(tiny_checkpoint, backend="torch", device="cpu")


def _expected(reference: Session, texts: list[str], **options) -> list[list[int]]:
    ids = [ByteTokenizer().encode(t) for t in texts]
    return [list(t) for t in reference.generate(ids, GenerationOptions(NEW, **options)).tokens]


def _post(server, path: str, body: dict) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=120)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return connection.getresponse()


def test_generate_extension_json(server, reference) -> None:
    response = _post(server, "/v2/models/tiny/generate", {"text_input": PROMPTS, "max_tokens": NEW})
    answer = json.loads(response.read())
    assert response.status == 200, answer
    expected = _expected(reference, PROMPTS)
    assert answer["output_ids"] == expected and answer["finish_reason"] == ["length", "length"]
    assert answer["text_output"] == [ByteTokenizer().decode(t) for t in expected]
    single = json.loads(_post(server, "/v2/models/tiny/generate",
                              {"input_ids": ByteTokenizer().encode(PROMPTS[0]),
                               "parameters": {"max_new_tokens": 4, "strategy": "sample", "seed": 3}}).read())
    sampled = reference.generate([ByteTokenizer().encode(PROMPTS[0])],
                                 GenerationOptions(4, strategy="sample", seed=3)).tokens[0]
    assert single["output_ids"] == list(sampled)


def test_generate_stream_sends_one_event_per_token(server, reference) -> None:
    response = _post(server, "/v2/models/tiny/generate_stream", {"text_input": PROMPTS[1], "max_tokens": NEW})
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = [json.loads(line[len(b"data: "):]) for line in response.read().split(b"\n\n") if line]
    expected = _expected(reference, [PROMPTS[1]])[0]
    assert [e["output_ids"][0] for e in events] == expected and [e["step"] for e in events] == list(range(NEW))
    assert "".join(e["text_output"] for e in events) == ByteTokenizer().decode(expected)
    assert events[-1]["finished"] and events[-1]["finish_reason"] == "length"
    assert not any(e["finished"] for e in events[:-1])


def test_v2_infer_returns_the_whole_generation(server, reference) -> None:
    texts = np.array([[p.encode()] for p in PROMPTS], dtype=object)
    tensor = httpclient.InferInput("text", list(texts.shape), "BYTES")
    tensor.set_data_from_numpy(texts)
    client = httpclient.InferenceServerClient(server.http)
    outputs = [httpclient.InferRequestedOutput(n) for n in ("generated_ids", "generated_text", "lengths")]
    result = client.infer("tiny", [tensor], outputs=outputs, parameters={"max_new_tokens": NEW})
    expected = _expected(reference, PROMPTS)
    assert result.as_numpy("generated_ids").tolist() == expected
    assert [t.decode() for t in result.as_numpy("generated_text")] == [ByteTokenizer().decode(t) for t in expected]
    assert result.as_numpy("lengths").tolist() == [NEW, NEW]
    meta = {o["name"]: o for o in client.get_model_metadata("tiny")["outputs"]}
    assert meta["generated_ids"]["shape"] == [-1, -1] and meta["generated_text"]["datatype"] == "BYTES"


def test_grpc_stream_one_response_per_token_and_unary_infer(server, reference) -> None:
    ids = np.array([ByteTokenizer().encode(PROMPTS[0])], dtype=np.int64)
    answers: list = []
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    tensor = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    client.async_stream_infer("tiny", [tensor], request_id="g", outputs=[grpcclient.InferRequestedOutput(
        "generated_ids")], parameters={"stream": True, "max_new_tokens": NEW})
    client.stop_stream()
    assert all(error is None for _, error in answers) and len(answers) == NEW
    tokens = [int(result.as_numpy("generated_ids")[0]) for result, _ in answers]
    expected = _expected(reference, [PROMPTS[0]])[0]
    assert tokens == expected
    assert answers[-1][0].get_response().parameters["finished"].bool_param
    unary = client.infer("tiny", [tensor], outputs=[grpcclient.InferRequestedOutput("generated_ids")],
                         parameters={"max_new_tokens": NEW})
    assert unary.as_numpy("generated_ids").tolist() == [expected]


@pytest.mark.parametrize("path,body,words", [
    ("/v2/models/onnx/generate", {"text_input": "x"}, "cannot generate: it is an exported onnxruntime file"),
    ("/v2/models/tiny/generate", {"text_input": "x", "temperature": -1}, "temperature"),
    ("/v2/models/tiny/generate", {"text_input": "x", "input_ids": [1]}, "one of them"),
    ("/v2/models/tiny/generate_stream", {"text_input": "x", "max_tokens": 0}, "max_tokens"),
    ("/v2/models/tiny/generate", {"input_ids": [1, 9999]}, "9999"),
])
def test_bad_generation_requests_are_400(server, path: str, body: dict, words: str) -> None:
    response = _post(server, path, body)
    payload = json.loads(response.read())
    assert response.status == 400 and words in payload["error"], payload


def test_generated_outputs_do_not_mix_with_forward_outputs(server) -> None:
    client = httpclient.InferenceServerClient(server.http)
    tensor = httpclient.InferInput("input_ids", [1, 3], "INT64")
    tensor.set_data_from_numpy(np.array([[5, 6, 7]], dtype=np.int64))
    outputs = [httpclient.InferRequestedOutput(n) for n in ("generated_ids", "logits")]
    with pytest.raises(InferenceServerException, match="cannot be combined"):
        client.infer("tiny", [tensor], outputs=outputs)


def test_forward_requests_run_between_the_tokens_of_a_long_generation(server) -> None:
    """A generation takes the model's worker one token at a time: an infer sent after its first event is
    answered while tokens still arrive, not after the last one."""
    response = _post(server, "/v2/models/tiny/generate_stream", {"input_ids": [5, 6, 7], "max_tokens": 600})
    assert response.status == 200
    arrivals: list[float] = []

    def read_events() -> None:
        for line in response:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())

    reader = threading.Thread(target=read_events)
    reader.start()
    while not arrivals:
        time.sleep(0.005)  # the generation is under way
    client = httpclient.InferenceServerClient(server.http)
    tensor = httpclient.InferInput("input_ids", [1, 3], "INT64")
    tensor.set_data_from_numpy(np.array([[5, 6, 7]], dtype=np.int64))
    client.infer("tiny", [tensor], outputs=[httpclient.InferRequestedOutput("last_logits")])
    answered = time.monotonic()
    reader.join(timeout=120)
    assert len(arrivals) == 600
    after = sum(t > answered for t in arrivals)
    assert after >= 100, f"only {after} of 600 tokens came after the infer's answer: it waited for the generation"


def _canceled(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics").read().decode()
    found = re.search(r'nv_inference_request_failure\{model="tiny",reason="CANCELED",version="1"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_leaves_a_stream_is_counted_canceled_and_the_model_serves_on(server, reference) -> None:
    before = _canceled(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=120)
    body = json.dumps({"input_ids": [5], "max_tokens": 1000})
    connection.request("POST", "/v2/models/tiny/generate_stream", body=body)
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_until(lambda: _canceled(server) == before + 1), "the stream's end was not counted as canceled"
    answer = json.loads(_post(server, "/v2/models/tiny/generate", {"text_input": PROMPTS[0], "max_tokens": NEW}).read())
    assert answer["output_ids"] == _expected(reference, [PROMPTS[0]])[0]
