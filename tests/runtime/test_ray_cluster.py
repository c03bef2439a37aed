"""Ray beyond one node (marked ``ray`` and ``slow``): one local two-node cluster for the module, built with
``ray.cluster_utils.Cluster`` on this machine -- a head and a worker node of one CPU each, on 127.0.0.1, in the
hermetic environment of ``helpers/ray_harness.hermetic_ray``. ``reformer-rt serve --ray --address`` joins it and puts a
replica on each node, as the replicas themselves report (``X-Reformer-Node``); Ray Data embeds on both nodes, each
embedding equal to ``Session.embed``; removing the worker node under load ends every request as a correct answer or
an error a client retries, the survivor serves on, and the lost replica comes back on a node that joins afterwards.

The tests share the cluster and run in file order: Ray Data needs the nodes' CPUs free of replicas, and the node
removal comes last."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray]')")

from ray.cluster_utils import Cluster  # noqa: E402
from helpers.artifacts import Artifacts  # noqa: E402
from helpers.ray_harness import (  # noqa: E402
    call, free_port, hermetic_ray, last_logits, raw_request, start_serve_on_ray,
)
from helpers.serving import SERVED_LM, wait_until  # noqa: E402

from reformer_rt.models.tokenizer import ByteTokenizer  # noqa: E402
from reformer_rt.runtime import Session  # noqa: E402
from reformer_rt.runtime.serving.ray_serve import (  # noqa: E402
    APP_NAME, DEPLOYMENT, NODE_HEADER, REPLICA_HEADER, RayServeOptions, deployment,
)
from reformer_rt.runtime.serving.spec import ModelSpec, SessionDefaults  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

#: Every node: one CPU, loopback, ports the OS picks (the dashboard agent's too), no dashboard.
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "dashboard_agent_listen_port": None}


@dataclasses.dataclass
class TwoNodes:
    cluster: Cluster
    worker: Any  # the worker's ray._private.node.Node: the node the removal test takes away


@pytest.fixture(scope="module")
def checkpoint(artifacts: Artifacts) -> Path:
    """The served tiny LM of the server tests (byte vocabulary and tokenizer, up to 2048 tokens)."""
    return artifacts.checkpoint(SERVED_LM)


@pytest.fixture(scope="module")
def nodes() -> Iterator[TwoNodes]:
    """The head, which this process joins by its address, and one worker node."""
    with hermetic_ray():
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args=NODE)
            two = TwoNodes(cluster, cluster.add_node(**NODE))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            assert len(_alive_nodes()) == 2 and ray.cluster_resources()["CPU"] == 2
            yield two
        finally:
            if ray.is_initialized():  # else serve.shutdown() would start a connection of its own
                serve.shutdown()
                ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


def _alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def _nodes_answering(url: str, count: int) -> set[str]:
    """The nodes named by ``count`` concurrent answers, each of which must be a 200. Connections spread over the
    nodes' proxies (one port, shared by SO_REUSEPORT) and each proxy over the replicas."""
    seqs = [np.arange(3 * i + 20, dtype=np.int64) % 258 for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda seq: raw_request(url, seq), seqs))
    assert all(status == 200 for status, _, _ in replies), [(s, b[:200]) for s, _, b in replies if s != 200]
    return {headers[NODE_HEADER] for _, headers, _ in replies}


def test_serve_command_joins_the_cluster_and_puts_a_replica_on_each_node(nodes, checkpoint) -> None:
    port = free_port()
    process, lines = start_serve_on_ray(
        "--address", nodes.cluster.address, "--replicas", "2", "--max-replicas-per-node", "1", "--backend", "torch",
        "--device", "cpu", "--http-port", str(port), f"tiny={checkpoint}", env={**os.environ})
    try:
        log = "".join(lines)
        assert process.poll() is None, log
        assert f"cluster {nodes.cluster.address}" in log and "max_replicas_per_node=1" in log, log
        assert _nodes_answering(f"127.0.0.1:{port}", 40) == _alive_nodes()
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert APP_NAME not in serve.status().applications
    serve.shutdown()  # the command left the joined cluster's Serve running, on its port; the next tests start theirs


def test_serve_command_without_address_starts_a_cluster_of_its_own(nodes, checkpoint) -> None:
    """Not the one named by the address file ``Cluster`` wrote, which a bare ``ray.init()`` would join -- and which
    the command, taking it for its own, would have stopped Serve on at exit."""
    from ray._common.utils import get_ray_address_file

    assert Path(get_ray_address_file(None)).read_text() == nodes.cluster.address
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    port = free_port()
    process, lines = start_serve_on_ray("--replicas", "1", "--backend", "torch", "--device", "cpu", "--http-port",
                                        str(port), f"tiny={checkpoint}", env=env)
    try:
        log = "".join(lines)
        assert process.poll() is None, log
        assert "cluster local (started here)" in log, log
        status, headers, _ = raw_request(f"127.0.0.1:{port}", np.arange(40, dtype=np.int64))
        assert status == 200 and headers[NODE_HEADER] not in _alive_nodes()
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()


def _nodes_used(stats: str, operator: str) -> int:
    """The "nodes used" that Ray Data's stats report for the operator whose name holds ``operator``."""
    sections = [s for s in re.split(r"\n(?=Operator \d+ )", stats) if s.startswith("Operator")]
    found = [s for s in sections if operator in s.splitlines()[0]]
    assert found, f"no operator {operator} in the dataset's stats:\n{stats}"
    match = re.search(r"Tasks per node: .*; (\d+) nodes used", found[-1])
    assert match, f"no node count for {operator} in the dataset's stats:\n{found[-1]}"
    return int(match.group(1))


def test_ray_data_embeds_on_both_nodes_like_session_embed(nodes, checkpoint, tmp_path) -> None:
    from reformer_rt.runtime.ray_data import embed_dataset

    folder = tmp_path / "docs"
    folder.mkdir()
    texts = ["def f():\n    return 1\n" * n for n in (1, 9, 3, 40, 17, 5, 28, 2)]
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text)
    dataset = ray.data.read_binary_files(str(folder), include_paths=True)
    # 0.6 CPU per actor, nodes of one CPU: the two actors cannot share a node.
    embedded = embed_dataset(dataset, checkpoint, text_column="bytes", concurrency=2, num_cpus=0.6, batch_size=2,
                             backend="torch", device="cpu").materialize()
    assert _nodes_used(embedded.stats(), "_Embed") == 2
    rows = embedded.take_all()
    assert sorted(Path(r["path"]).name for r in rows) == sorted(f"doc{i}.txt" for i in range(len(texts)))
    session = Session(checkpoint, backend="torch", device="cpu")
    for row in rows:
        ids = ByteTokenizer().encode(Path(row["path"]).read_text())
        assert row["tokens"] == len(ids)
        assert np.abs(np.asarray(row["embedding"]) - session.embed([ids])[0]).max() <= 1e-5


@pytest.fixture(scope="module")
def app(nodes, checkpoint) -> Iterator[str]:
    """Two replicas of a quarter CPU, at most one per node. Requests wait a quarter second for batch-mates in a
    replica, so that a node taken away under load takes requests with it."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = RayServeOptions((ModelSpec("tiny", str(checkpoint)),), SessionDefaults("torch", "cpu", threads=1),
                              batch_wait_timeout_s=0.25)
    bound = deployment(options, num_replicas=2, max_replicas_per_node=1,
                       ray_actor_options={"num_cpus": 0.25}).bind(options)
    serve.run(bound, name=APP_NAME, route_prefix="/")
    yield f"127.0.0.1:{port}"
    serve.delete(APP_NAME)


def _replica_states() -> dict[str, int]:
    return dict(serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states)


def _retryable(status: int, headers: Any) -> bool:
    """A lost connection (the proxy went with its node), a 503, or an error no replica wrote: every reply of a
    replica names it (``X-Reformer-Replica``, errors included), so a 500 without that header is Ray Serve's proxy
    saying that the replica holding the request was lost before it answered. Inference changes nothing, so the
    client sends the request again."""
    return status in (0, 503) or (status >= 500 and REPLICA_HEADER not in headers)


def test_removing_a_node_under_load_loses_no_request(nodes, app, checkpoint) -> None:
    session = Session(checkpoint, backend="torch", device="cpu")
    assert _nodes_answering(app, 40) == _alive_nodes()
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 258, int(rng.integers(200, 1200)), dtype=np.int64) for _ in range(12)]
    expected = [session.run([seq], outputs=["last_logits"]).rows["last_logits"][0] for seq in seqs]
    stop = threading.Event()
    outcomes: list[tuple[int, tuple[int, Any, bytes], float, float]] = []  # (sequence, reply, sent, ended)

    def load(first: int, step: int) -> None:
        i = first
        while not stop.is_set():
            sent = time.monotonic()
            reply = call(app, seqs[i % len(seqs)])
            outcomes.append((i % len(seqs), reply, sent, time.monotonic()))
            i += step

    loaders = 6
    with concurrent.futures.ThreadPoolExecutor(loaders) as pool:
        running = [pool.submit(load, first, loaders) for first in range(loaders)]
        assert wait_until(lambda: len(outcomes) >= 2 * loaders, timeout=60, interval=0.05)
        removing = time.monotonic()
        nodes.cluster.remove_node(nodes.worker)
        time.sleep(5)  # the load goes on while Serve notices the loss
        stop.set()
        for loader in running:
            loader.result(timeout=180)  # every request ends: none hangs
    assert any(sent < removing < ended for _, _, sent, ended in outcomes), "no request in flight at the removal"
    for i, (status, headers, body), _, _ in outcomes:
        if status == 200:
            assert np.abs(last_logits(body) - expected[i]).max() <= 1e-5
        else:
            assert _retryable(status, headers), (status, dict(headers or {}), body[:300])

    # The survivor serves alone; Serve counts the lost replica out, and its replacement waits for a node of its own
    # (at most one per node) ...
    assert wait_until(lambda: len(_alive_nodes()) == 1, timeout=60)
    head = _alive_nodes()
    assert wait_until(lambda: all(call(app, seq)[0] == 200 for seq in seqs[:4]), timeout=60)
    assert _nodes_answering(app, 8) == head
    assert wait_until(lambda: _replica_states().get("RUNNING") == 1, timeout=60), _replica_states()
    # ... and starts on one that joins: had it started beside the survivor, only the head would answer.
    nodes.worker = nodes.cluster.add_node(**NODE)
    assert wait_until(lambda: _replica_states().get("RUNNING") == 2, timeout=120), _replica_states()
    assert len(_alive_nodes()) == 2 and _nodes_answering(app, 40) == _alive_nodes()
