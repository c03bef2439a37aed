"""Scale-out on Ray (marked ``ray``; one local 2-CPU cluster for the module, of its own and on loopback:
``helpers/ray_harness.hermetic_ray``): a 2-replica Ray Serve deployment answers tritonclient over the same KServe v2
endpoints as ``reformer-rt serve``, each result equal to ``Session.run``, spread over both replicas; a replica killed
during load is replaced and no request is silently lost; ``reformer-rt serve --ray`` deploys and drains; Ray Data
embeds a folder of documents exactly as ``Session.embed`` does. The last three start Ray actors of their own (each
imports torch and loads the model): 20-70 s each on 2 cores, so they are ``slow``."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray]')")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install '.[test]')")

from helpers.artifacts import Artifacts  # noqa: E402
from helpers.ray_harness import (  # noqa: E402
    call, free_port, hermetic_ray, last_logits, raw_request, start_serve_on_ray,
)
from helpers.serving import SERVED_LM, wait_until  # noqa: E402

from reformer_rt.models.tokenizer import ByteTokenizer  # noqa: E402
from reformer_rt.runtime import GenerationOptions, Session  # noqa: E402
from reformer_rt.runtime.serving.ray_serve import (  # noqa: E402
    APP_NAME, DEPLOYMENT, REPLICA_HEADER, RayServeOptions, deployment,
)
from reformer_rt.runtime.serving.spec import ModelSpec, SessionDefaults  # noqa: E402

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def checkpoint(artifacts: Artifacts) -> Path:
    """The served tiny LM of the server tests (byte vocabulary and tokenizer, up to 2048 tokens)."""
    return artifacts.checkpoint(SERVED_LM)


@pytest.fixture(scope="module")
def cluster():
    # "local": a cluster of our own even where RAY_ADDRESS or the address file of a past `ray start` names another,
    # which a bare ray.init() would join.
    with hermetic_ray():
        context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield context
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def app(cluster, checkpoint):
    """Two CPU replicas of half a CPU each (the rest of the cluster stays free for Ray Data)."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = RayServeOptions((ModelSpec("tiny", str(checkpoint)),), SessionDefaults("torch", "cpu", threads=1),
                              batch_wait_timeout_s=0.005)
    bound = deployment(options, num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(options)
    serve.run(bound, name=APP_NAME, route_prefix="/")
    yield f"127.0.0.1:{port}"
    serve.delete(APP_NAME)
    serve.shutdown()


def _request(url: str, seq: np.ndarray) -> np.ndarray:
    """tritonclient, binary tensors: last_logits and embedding of one sequence, concatenated."""
    client = httpclient.InferenceServerClient(url, network_timeout=120)
    ids = httpclient.InferInput("input_ids", [1, len(seq)], "INT64")
    ids.set_data_from_numpy(seq[None])
    outputs = [httpclient.InferRequestedOutput(n) for n in ("last_logits", "embedding")]
    result = client.infer("tiny", [ids], outputs=outputs)
    client.close()
    return np.concatenate([result.as_numpy("last_logits")[0], result.as_numpy("embedding")[0]])


def _expected(session: Session, seq: np.ndarray) -> np.ndarray:
    result = session.run([seq], outputs=["last_logits", "embedding"])
    return np.concatenate([result.rows["last_logits"][0], result.rows["embedding"][0]])


def test_two_replicas_answer_concurrent_ragged_requests_each_as_alone(app, checkpoint) -> None:
    session = Session(checkpoint, backend="torch", device="cpu")
    client = httpclient.InferenceServerClient(app)
    assert client.is_server_ready() and [m["name"] for m in client.get_model_repository_index()] == ["tiny"]
    assert client.get_model_metadata("tiny")["outputs"][0]["shape"] == [-1, -1, 258]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 258, int(rng.integers(10, 400)), dtype=np.int64) for _ in range(24)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda s: _request(app, s), seqs))
        replicas = {headers.get(REPLICA_HEADER) for _, headers, _ in pool.map(lambda s: raw_request(app, s), seqs)}
    for seq, got in zip(seqs, answers):
        assert np.abs(got - _expected(session, seq)).max() <= 1e-5
    assert len(replicas) == 2, f"requests reached replicas {replicas}"


def _post_json(url: str, path: str, body: dict) -> tuple[int, str, bytes]:
    import http.client

    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def test_replicas_generate_whole_and_streamed_like_session_generate(app, checkpoint) -> None:
    session = Session(checkpoint, backend="torch", device="cpu")
    prompts = [[72, 101, 108, 108, 111] * 7, [100, 101, 102]]
    expected = [list(t) for t in session.generate(prompts, GenerationOptions(6)).tokens]
    status, _, body = _post_json(app, "/v2/models/tiny/generate", {"input_ids": prompts, "max_tokens": 6})
    assert status == 200 and json.loads(body)["output_ids"] == expected
    status, kind, body = _post_json(app, "/v2/models/tiny/generate_stream", {"input_ids": prompts[1], "max_tokens": 6})
    events = [json.loads(chunk[len(b"data: "):]) for chunk in body.split(b"\n\n") if chunk]
    assert status == 200 and kind.startswith("text/event-stream")
    assert [e["output_ids"][0] for e in events] == expected[1] and events[-1]["finished"]
    ids = httpclient.InferInput("input_ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.array([prompts[1]], dtype=np.int64))
    client = httpclient.InferenceServerClient(app)
    result = client.infer("tiny", [ids], outputs=[httpclient.InferRequestedOutput("generated_ids")],
                          parameters={"max_new_tokens": 6})
    assert result.as_numpy("generated_ids").tolist() == [expected[1]]


def _replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and DEPLOYMENT in a["name"])


def _running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
    return status.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_a_replica_killed_during_load_is_replaced_and_no_request_is_lost(app, checkpoint) -> None:
    session = Session(checkpoint, backend="torch", device="cpu")
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 258, 1000, dtype=np.int64) for _ in range(20)]
    before = _replica_actors()
    assert len(before) == 2

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, app, seq) for seq in seqs]
        futures[3].result()
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        outcomes = [f.result(timeout=180) for f in futures]  # every request answers: none hangs
    for seq, (status, _, body) in zip(seqs, outcomes):
        if status == 200:
            expected = session.run([seq], outputs=["last_logits"]).rows["last_logits"][0]
            assert np.abs(last_logits(body) - expected).max() <= 1e-5
        else:
            assert status == 0 or status >= 500, (status, body[:200])  # a lost connection or an error: retried

    def replaced() -> bool:
        actors = _replica_actors()
        return len(actors) == 2 and before[0] not in actors and _running_replicas() == 2

    wait_until(replaced, timeout=90)
    after = _replica_actors()
    assert len(after) == 2 and before[0] not in after, after
    assert all(raw_request(app, seq)[0] == 200 for seq in seqs[:6])


@pytest.mark.slow
def test_ray_data_embeds_a_folder_of_documents_like_session_embed(cluster, checkpoint, tmp_path) -> None:
    from reformer_rt.runtime.ray_data import embed_dataset

    folder = tmp_path / "docs"
    folder.mkdir()
    texts = ["def f():\n    return 1\n" * n for n in (1, 9, 3, 40, 17)]
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text)
    dataset = ray.data.read_binary_files(str(folder), include_paths=True)
    embedded = embed_dataset(dataset, checkpoint, text_column="bytes", concurrency=2, num_cpus=0.25,
                             backend="torch", device="cpu")
    embedded.write_parquet(str(tmp_path / "out"))
    import pyarrow.parquet as pq

    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert sorted(Path(r["path"]).name for r in rows) == sorted(f"doc{i}.txt" for i in range(len(texts)))
    assert [r["tokens"] for r in rows] == sorted(r["tokens"] for r in rows)  # bucket order
    session = Session(checkpoint, backend="torch", device="cpu")
    for row in rows:
        ids = ByteTokenizer().encode(Path(row["path"]).read_text())
        assert row["tokens"] == len(ids)
        assert np.abs(np.array(row["embedding"]) - session.embed([ids])[0]).max() <= 1e-5


@pytest.mark.slow
def test_serve_command_deploys_on_ray_and_drains(cluster, app, checkpoint) -> None:
    """``reformer-rt serve --ray`` joins this cluster (Serve restarted on a new port), serves, and removes its
    application on SIGTERM."""
    serve.delete(APP_NAME)
    serve.shutdown()
    port = free_port()
    process, lines = start_serve_on_ray("--address", cluster.address_info["address"], "--replicas", "1", "--backend",
                                        "torch", "--device", "cpu", "--http-port", str(port), f"tiny={checkpoint}",
                                        env={**os.environ})
    try:
        assert process.poll() is None, "".join(lines)
        status, headers, body = raw_request(f"127.0.0.1:{port}", np.arange(40, dtype=np.int64))
        assert status == 200 and headers.get(REPLICA_HEADER)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert APP_NAME not in serve.status().applications
