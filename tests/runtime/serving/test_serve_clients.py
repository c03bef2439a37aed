"""``reformer-rt serve`` with the clients production stacks use: tritonclient HTTP and gRPC, sync and asyncio,
binary and JSON tensors. Every output equals ``Session.run`` on the same input run alone; many concurrent clients
each get exactly their own result; the metrics move as the requests say."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from helpers.serving import SERVED_LM, ragged_sequences
from tritonclient.utils import InferenceServerException

from reformer_rt.runtime import Session

CONFIG = SERVED_LM.config
ALL_OUTPUTS = ("logits", "last_logits", "top_k_ids", "top_k_log_probs", "log_probs", "last_hidden_state",
               "embedding", "lengths")
TOL = 1e-5  # the same model on the same CPU; batch-mates may change the last bits of a matrix product


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> Session:
    return Session(tiny_checkpoint, backend="torch", device="cpu")


def expected(reference: Session, seq: np.ndarray, names=ALL_OUTPUTS, top_k: int = 5, pooling: str = "mean") -> dict:
    kinds = [n for n in names if n != "lengths"]
    result = reference.run([seq], outputs=kinds, top_k=top_k, pooling=pooling)
    out = {name: result.rows[name][0] for name in kinds}
    out["lengths"] = np.array([len(seq)])
    return out


def check(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "iu":
        assert np.array_equal(got, want), name
    else:
        assert np.abs(got - want).max(initial=0.0) <= TOL, f"{name}: max diff {np.abs(got - want).max()}"


def padded(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(seqs), max(len(s) for s in seqs)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def http_inputs(module, ids: np.ndarray, mask: np.ndarray | None, binary: bool) -> list:
    inputs = [module.InferInput("input_ids", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids, binary_data=binary)
    if mask is not None:
        inputs.append(module.InferInput("attention_mask", list(mask.shape), "INT64"))
        inputs[1].set_data_from_numpy(mask, binary_data=binary)
    return inputs


def grpc_inputs(module, ids: np.ndarray, mask: np.ndarray | None = None) -> list:
    inputs = [module.InferInput("input_ids", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    if mask is not None:
        inputs.append(module.InferInput("attention_mask", list(mask.shape), "INT64"))
        inputs[1].set_data_from_numpy(mask)
    return inputs


def check_batch(result, seqs: list[np.ndarray], reference: Session, names=ALL_OUTPUTS, **options) -> None:
    """A ragged [N, L] request's outputs: row i equals sequence i run alone, zero-padded beyond it."""
    for i, seq in enumerate(seqs):
        want = expected(reference, seq, names, **options)
        for name in names:
            got = result.as_numpy(name)[i]
            row = want[name][0] if name == "lengths" else want[name]
            if got.ndim and row.ndim and got.shape[0] > row.shape[0]:  # padded along the sequence
                assert not got[row.shape[0]:].any(), f"{name}: padding is not zero"
                got = got[:row.shape[0]]
            check(np.asarray(got), np.asarray(row), name)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_ragged_batch_every_output_equals_session(server, reference, binary: bool) -> None:
    seqs = ragged_sequences(3, seed=1)
    ids, mask = padded(seqs)
    client = httpclient.InferenceServerClient(server.http)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ALL_OUTPUTS]
    result = client.infer("tiny", http_inputs(httpclient, ids, mask, binary), outputs=outputs,
                          parameters={"top_k": 4, "pooling": "last"})
    check_batch(result, seqs, reference, top_k=4, pooling="last")
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in result.get_response()["outputs"]]
    assert all(size for size in sizes) if binary else not any(sizes)


def test_http_rank_one_input_and_default_output(server, reference) -> None:
    seq = ragged_sequences(1, seed=2)[0]
    client = httpclient.InferenceServerClient(server.http)
    result = client.infer("tiny", http_inputs(httpclient, seq, None, True))  # no outputs named: the model's own
    assert [o["name"] for o in result.get_response()["outputs"]] == ["logits"]
    check(result.as_numpy("logits"), expected(reference, seq, ["logits"])["logits"], "logits")


def test_http_text_input_is_tokenized_by_the_model_tokenizer(server, reference) -> None:
    texts = ["def f(x):\n    return x", "héllo wörld"]
    data = np.array([[t.encode()] for t in texts], dtype=object)
    text = httpclient.InferInput("text", list(data.shape), "BYTES")
    text.set_data_from_numpy(data)
    client = httpclient.InferenceServerClient(server.http)
    result = client.infer("tiny", [text], outputs=[httpclient.InferRequestedOutput(n) for n in ("log_probs",
                                                                                              "lengths")])
    seqs = [np.array([b + 2 for b in t.encode()], dtype=np.int64) for t in texts]  # the byte tokenizer: id = byte+2
    assert result.as_numpy("lengths").tolist() == [len(s) for s in seqs]
    check_batch(result, seqs, reference, names=("log_probs",))


def test_grpc_sync_every_output_equals_session(server, reference) -> None:
    seqs = ragged_sequences(2, seed=3)
    ids, mask = padded(seqs)
    client = grpcclient.InferenceServerClient(server.grpc)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ALL_OUTPUTS]
    result = client.infer("tiny", grpc_inputs(grpcclient, ids, mask), outputs=outputs, parameters={"top_k": 3})
    check_batch(result, seqs, reference, top_k=3)


def test_asyncio_clients_http_and_grpc(server, reference) -> None:
    seqs = ragged_sequences(6, seed=4)

    async def main() -> None:
        http = httpaio.InferenceServerClient(server.http)
        grpc = grpcaio.InferenceServerClient(server.grpc)
        try:
            assert await http.is_server_ready() and await grpc.is_server_ready()
            calls = []
            for i, seq in enumerate(seqs):
                names = ("last_logits", "embedding")
                if i % 2:
                    calls.append(http.infer("twin", http_inputs(httpaio, seq[None], None, i % 4 == 1),
                                            outputs=[httpaio.InferRequestedOutput(n) for n in names]))
                else:
                    calls.append(grpc.infer("twin", grpc_inputs(grpcaio, seq[None]),
                                            outputs=[grpcaio.InferRequestedOutput(n) for n in names]))
            for seq, result in zip(seqs, await asyncio.gather(*calls)):
                check_batch(result, [seq], reference, names=("last_logits", "embedding"))
        finally:
            await http.close()
            await grpc.close()

    asyncio.run(main())


def test_descriptions_over_http_and_grpc(server) -> None:
    http = httpclient.InferenceServerClient(server.http)
    grpc = grpcclient.InferenceServerClient(server.grpc)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("tiny")
    assert grpc.is_server_live() and grpc.is_model_ready("twin") and not http.is_model_ready("absent")
    meta = http.get_model_metadata("tiny")
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes["logits"] == [-1, -1, CONFIG.vocab_size] and shapes["embedding"] == [-1, 2 * CONFIG.hidden_size]
    assert {i["name"] for i in meta["inputs"]} == {"input_ids", "attention_mask", "text"}
    assert [o.name for o in grpc.get_model_metadata("tiny").outputs] == [o["name"] for o in meta["outputs"]]
    config = http.get_model_config("tiny")
    assert config["max_batch_size"] > 0 and [i["dims"] for i in config["input"]][0] == ["-1"]
    assert grpc.get_model_config("tiny").config.name == "tiny"
    index = http.get_model_repository_index()
    assert [(m["name"], m["state"]) for m in index] == [("onnx", "READY"), ("tiny", "READY"), ("twin", "READY")]
    assert [m.name for m in grpc.get_model_repository_index().models] == ["onnx", "tiny", "twin"]
    assert "queue delay 2000 us" in server.log  # the command line wins over the config file's 5000
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="no version '2'"):
        http.get_model_metadata("tiny", model_version="2")
    stats = http.get_inference_statistics("tiny")["model_stats"][0]
    assert stats["name"] == "tiny" and "success" in stats["inference_stats"]


def _metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r'^(\w+)\{([^}]*)\} (\S+)$', line)
        if match and 'model="tiny"' in match.group(2):
            reason = re.search(r'reason="(\w+)"', match.group(2))
            le = re.search(r'le="([^"]+)"', match.group(2))
            key = match.group(1) + (f":{reason.group(1)}" if reason else "") + (f":{le.group(1)}" if le else "")
            values[key] = float(match.group(3))
    return values


def test_concurrent_ragged_clients_each_get_their_own_result_and_metrics_move(server, reference) -> None:
    # lengths from three buckets, so requests can share forward passes
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, CONFIG.vocab_size, int(rng.choice([rng.integers(17, 33), rng.integers(49, 65),
                                                               rng.integers(97, 129)])), dtype=np.int64)
            for _ in range(48)]
    before = _metrics(server)

    def call(i: int) -> tuple[int, dict]:
        names = ("logits", "top_k_ids", "embedding")
        if i % 2:
            client = httpclient.InferenceServerClient(server.http)
            result = client.infer("tiny", http_inputs(httpclient, seqs[i][None], None, i % 4 == 1),
                                  outputs=[httpclient.InferRequestedOutput(n, binary_data=i % 3 > 0) for n in names])
        else:
            client = grpcclient.InferenceServerClient(server.grpc)
            result = client.infer("tiny", grpc_inputs(grpcclient, seqs[i][None]),
                                  outputs=[grpcclient.InferRequestedOutput(n) for n in names])
        return i, {n: result.as_numpy(n)[0] for n in names}

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = dict(pool.map(call, range(len(seqs))))
    for i, seq in enumerate(seqs):
        want = expected(reference, seq, ("logits", "top_k_ids", "embedding"))
        for name, got in results[i].items():
            check(got, want[name], f"sequence {i} {name}")
    after = _metrics(server)
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == len(seqs)
    assert after["nv_inference_count"] - before["nv_inference_count"] == len(seqs)
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert executions < len(seqs), "32 concurrent clients never shared a forward pass"
    assert after["reformer_rt_tokens_total"] - before["reformer_rt_tokens_total"] == sum(len(s) for s in seqs)
    assert after["nv_inference_pending_request_count"] == 0
    assert after["nv_inference_compute_infer_duration_us"] > before["nv_inference_compute_infer_duration_us"]


def test_onnx_model_serves_its_outputs_and_refuses_the_others(server, tiny_onnx) -> None:
    onnx_session = Session(tiny_onnx, backend="onnxruntime", device="cpu")
    seqs = ragged_sequences(3, seed=6, high=128)  # the shared tiny export's longest
    ids, mask = padded(seqs)
    client = httpclient.InferenceServerClient(server.http)
    names = ("logits", "last_logits", "top_k_ids", "log_probs")
    assert [o["name"] for o in client.get_model_metadata("onnx")["outputs"]] == [*names[:3], "top_k_log_probs",
                                                                                names[3], "lengths"]
    result = client.infer("onnx", http_inputs(httpclient, ids, mask, True),
                          outputs=[httpclient.InferRequestedOutput(n) for n in names])
    check_batch(result, seqs, onnx_session, names=names)
    with pytest.raises(InferenceServerException, match="needs last_hidden_state"):
        client.infer("onnx", http_inputs(httpclient, ids, mask, True),
                     outputs=[httpclient.InferRequestedOutput("embedding")])


def test_grpc_stream_answers_every_request_with_its_id(server, reference) -> None:
    seqs = ragged_sequences(5, seed=7)
    answers: list = []
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    for i, seq in enumerate(seqs):
        client.async_stream_infer("tiny", grpc_inputs(grpcclient, seq[None]), request_id=str(i),
                                  outputs=[grpcclient.InferRequestedOutput("last_logits")])
    bad = grpcclient.InferInput("input_ids", [1, 2], "INT64")
    bad.set_data_from_numpy(np.array([[1, 9999]], dtype=np.int64))
    client.async_stream_infer("tiny", [bad], request_id="bad")
    client.stop_stream()  # waits for the responses
    assert len(answers) == len(seqs) + 1
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "9999" in errors[0].message()
    for result, error in answers:
        if error is None:
            index = int(result.get_response().id)
            check(result.as_numpy("last_logits")[0], expected(reference, seqs[index], ["last_logits"])["last_logits"],
                  f"stream request {index}")
