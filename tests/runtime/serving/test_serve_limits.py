"""``reformer-rt serve`` with its defaults gives everything a checkpoint can give, within limits it states.

One server over the tiny checkpoint on the DEFAULT backend (ONNX Runtime on this CPU) with ``--max-new-tokens 16``,
beside a second model whose config contradicts its weights: generation and embeddings answer (the checkpoint's
PyTorch model beside the exported graph), equal to a torch Session; budgets over the cap or over the positions a
prompt leaves are 400s naming both numbers; a request's timeout ends its stream with finish reason ``timeout``; stop
sequences end it with ``stop_sequence``; ``details`` carries each token's log-probability; generations are counted
like forward passes; the model that failed to load is listed with its reason, answered with a 400, and the other
model serves on."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.runtime import GenerationOptions, Session
from helpers.serving import ServerProcess

CAP = 16
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def mismatched(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("limits") / "mismatched"
    shutil.copytree(tiny_checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": 10**12}))
    return directory


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, mismatched: Path) -> Iterator[ServerProcess]:
    with ServerProcess(f"tiny={tiny_checkpoint}", f"broken={mismatched}", "--device", "cpu", "--max-new-tokens",
                       str(CAP)) as process:
        yield process


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Session:
    return Session(tiny_checkpoint, backend="torch", device="cpu")


def _url(server: ServerProcess, path: str) -> str:
    return f"http://{server.http}{path}"


def _generate(server: ServerProcess, body: dict, stream: bool = False) -> requests.Response:
    return requests.post(_url(server, f"/v2/models/tiny/generate{'_stream' if stream else ''}"), json=body, timeout=120)


def _events(response: requests.Response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]


def test_defaults_serve_generation_and_embeddings_beside_the_fast_backend(server, reference) -> None:
    meta = requests.get(_url(server, "/v2/models/tiny"), timeout=30).json()
    assert meta["platform"] == "reformer-rt_onnxruntime"  # forward passes stay on the default backend
    assert "generate" in requests.get(_url(server, "/v2"), timeout=30).json()["extensions"]
    ids = ByteTokenizer().encode(PROMPT)
    answer = _generate(server, {"text_input": PROMPT, "parameters": {"max_tokens": 8}}).json()
    assert answer["output_ids"] == list(reference.generate([ids], GenerationOptions(8)).tokens[0])
    body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids}],
            "outputs": [{"name": "embedding"}]}
    got = requests.post(_url(server, "/v2/models/tiny/infer"), json=body, timeout=60).json()["outputs"][0]["data"]
    assert np.abs(np.array(got) - reference.embed([ids])[0]).max() <= 1e-4


@pytest.mark.parametrize(("parameters", "words"), [
    ({"max_tokens": CAP + 1}, [f"got {CAP + 1}", f"at most {CAP} new tokens", "--max-new-tokens"]),
    ({"max_new_tokens": CAP + 100}, [f"got {CAP + 100}", f"at most {CAP}"]),
])
def test_a_budget_over_the_cap_is_a_400_naming_both(server, parameters, words) -> None:
    for stream in (False, True):
        response = _generate(server, {"text_input": PROMPT, "parameters": parameters}, stream)
        assert response.status_code == 400 and all(w in response.json()["error"] for w in words), response.text


def test_a_budget_over_the_positions_left_is_a_400_naming_both(server, tiny_checkpoint) -> None:
    positions = json.loads((tiny_checkpoint / "config.json").read_text())["max_position_embeddings"]
    ids = [5] * (positions - 4)
    response = _generate(server, {"input_ids": ids, "parameters": {"max_tokens": 10}})
    error = response.json()["error"]
    assert response.status_code == 400 and "got 10" in error and f"leaves 4 of the model's {positions:,}" in error
    unasked = _generate(server, {"input_ids": ids}).json()  # no budget given: the default shrinks to what is left
    assert len(unasked["output_ids"]) == 4 and unasked["finish_reason"] == "length"


def test_a_timeout_ends_the_stream_with_its_reason(server) -> None:
    events = _events(_generate(server, {"text_input": PROMPT, "parameters": {"max_tokens": CAP, "timeout": 1}},
                               stream=True))
    assert len(events) == 1 and events[0]["finished"] and events[0]["finish_reason"] == "timeout"
    assert events[0]["details"]["finish_reason"] == "timeout"


def test_stop_sequences_end_a_prompt_and_details_give_logprobs(server, reference) -> None:
    whole = _generate(server, {"text_input": PROMPT, "parameters": {"max_tokens": CAP, "details": True}}).json()
    text = whole["text_output"]
    assert whole["details"]["finish_reason"] == "length" and len(whole["details"]["logprobs"]) == CAP
    first = reference.run([ByteTokenizer().encode(PROMPT)], outputs=["top_k_log_probs", "top_k_ids"], top_k=1)
    assert whole["details"]["logprobs"][0]["id"] == int(first["top_k_ids"][0, 0])
    assert abs(whole["details"]["logprobs"][0]["logprob"] - float(first["top_k_log_probs"][0, 0])) <= 1e-4
    assert all(token["logprob"] <= 0 for token in whole["details"]["logprobs"])
    stop = next(c for c in text[1:] if c.isascii() and c.isprintable())  # a character the continuation reaches
    ended = _generate(server, {"text_input": PROMPT, "parameters": {"max_tokens": CAP, "stop": [stop]}}).json()
    assert ended["finish_reason"] == "stop_sequence" and ended["text_output"] == text[:text.index(stop) + 1]


def _metric(server: ServerProcess, family: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics").read().decode()
    found = re.search(rf'{family}\{{model="tiny",version="1"\}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_generations_are_counted_like_forward_passes(server) -> None:
    before = {family: _metric(server, family) for family in ("nv_inference_count", "nv_inference_exec_count")}
    _generate(server, {"text_input": [PROMPT, PROMPT[:5]], "parameters": {"max_tokens": 3}})
    assert _metric(server, "nv_inference_count") == before["nv_inference_count"] + 2
    assert _metric(server, "nv_inference_exec_count") == before["nv_inference_exec_count"] + 3


def test_a_model_that_failed_to_load_is_listed_and_refused_while_the_other_serves(server) -> None:
    index = requests.post(_url(server, "/v2/repository/index"), json={}, timeout=30).json()
    broken = next(entry for entry in index if entry["name"] == "broken")
    assert broken["state"] == "UNAVAILABLE" and "vocab_size=1000000000000" in broken["reason"]
    response = requests.post(_url(server, "/v2/models/broken/infer"), json={"inputs": []}, timeout=30)
    assert response.status_code == 400 and "failed to load" in response.json()["error"]
    assert "failed to load" in server.log and "Traceback" not in server.log
    assert requests.get(_url(server, "/v2/models/tiny/ready"), timeout=30).status_code == 200
