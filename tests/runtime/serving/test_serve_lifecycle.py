"""The server's lifecycle and limits: SIGTERM drains with nothing lost, a full queue answers 503 with Retry-After,
a request that waits past its timeout gets 503, priorities order the queue, the restricted header and TLS guard
every endpoint but health, startup mistakes exit 2 with one line, and the bundled demo is served by default."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers.cli import in_process, one_error_line, real_process
from helpers.serving import SERVED_LM, ServerProcess, wait_until
from tritonclient.utils import InferenceServerException

from reformer_rt.runtime import Session
from reformer_rt.runtime.artifacts import CACHE_ENV

CONFIG = SERVED_LM.config
LONG = 2048  # the tiny model's longest input: tens of milliseconds per forward pass on the CPU


def _infer(port: int, seq: np.ndarray, timeout_us: int | None = None, priority: int = 0) -> tuple[int, dict, dict]:
    body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(seq)], "data": seq.tolist()}],
            "outputs": [{"name": "last_logits"}], "parameters": {}}
    if timeout_us is not None:
        body["parameters"]["timeout"] = timeout_us
    if priority:
        body["parameters"]["priority"] = priority
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v2/models/tiny/infer", body=json.dumps(body))
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def _pending(server: ServerProcess) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", server.ports["metrics"], timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    for line in text.splitlines():
        if line.startswith('nv_inference_pending_request_count{model="tiny"'):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_during_load_drains_every_accepted_request(tiny_checkpoint) -> None:
    """Every request gets an answer: the ones queued when SIGTERM came are served in full; any that arrive after it
    get 503 (the client retries elsewhere); none is dropped, and the process exits 0."""
    reference = Session(tiny_checkpoint, backend="torch", device="cpu")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, CONFIG.vocab_size, LONG - int(rng.integers(0, 64))) for _ in range(16)]
    with ServerProcess(f"tiny={tiny_checkpoint}", "--backend", "torch", "--device", "cpu", "--no-batching") as server:
        port = server.ports["http"]
        with concurrent.futures.ThreadPoolExecutor(len(seqs)) as pool:
            futures = [pool.submit(_infer, port, seq) for seq in seqs]
            assert wait_until(lambda: _pending(server) >= len(seqs) // 2, timeout=60), "the load never queued"
            queued = _pending(server)
            server.terminate()
            results = [f.result() for f in futures]  # an exception here would be a dropped connection
            assert server.wait(120) == 0, server.log
    served = 0
    for seq, (status, _, payload) in zip(seqs, results):
        if status == 503:
            assert "shutting down" in payload["error"]
            continue
        assert status == 200, payload
        served += 1
        want = reference.run([seq], outputs=["last_logits"])["last_logits"][0]
        assert np.abs(np.array(payload["outputs"][0]["data"]) - want).max() <= 1e-5
    assert served >= queued, f"{queued} requests were queued at SIGTERM, {served} were served"
    assert "draining" in server.log and "stopped" in server.log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.fixture(scope="module")
def patient_server(tiny_checkpoint):
    """Batches wait up to 3 s to fill and at most 2 requests may wait: queue limits become deterministic."""
    with ServerProcess(f"tiny={tiny_checkpoint}", "--backend", "torch", "--device", "cpu", "--max-queue-size", "2",
                       "--max-queue-delay-us", "3000000") as server:
        yield server


def test_full_queue_answers_503_with_retry_after(patient_server) -> None:
    seq = np.arange(40) % CONFIG.vocab_size
    port = patient_server.ports["http"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(_infer, port, seq) for _ in range(2)]
        assert wait_until(lambda: _pending(patient_server) == 2)
        status, headers, payload = _infer(port, seq)
        assert status == 503 and headers["Retry-After"] == "1" and "queue full" in payload["error"]
        assert [f.result()[0] for f in waiting] == [200, 200]  # they shared one pass after the delay


def test_request_waiting_past_its_timeout_gets_503(patient_server) -> None:
    started = time.monotonic()
    status, _, payload = _infer(patient_server.ports["http"], np.arange(20), timeout_us=200_000)
    assert status == 503 and "timed out after" in payload["error"], payload
    assert time.monotonic() - started < 2.5  # not the 3 s batch delay


def test_priority_orders_the_queue(tiny_checkpoint) -> None:
    """In process: while the worker is busy, requests queue; lower priority values run first."""
    from reformer_rt.runtime.serving.metrics import Metrics
    from reformer_rt.runtime.serving.model import ServedModel
    from reformer_rt.runtime.serving.protocol import InferRequest
    from reformer_rt.runtime.serving.scheduler import Scheduler, SchedulerOptions

    model = ServedModel("tiny", Session(tiny_checkpoint, backend="torch", device="cpu"))

    async def main() -> list[int]:
        scheduler = Scheduler(model, SchedulerOptions(batching=False), Metrics())
        scheduler.start()
        gate = threading.Event()
        blocker = asyncio.ensure_future(scheduler.call(gate.wait))  # the worker is busy until the gate opens
        finished: list[int] = []

        async def one(priority: int) -> None:
            ids = np.arange(10, dtype=np.int64)[None]
            request = InferRequest("tiny", "", "", {"input_ids": ids}, {"last_logits": False},
                                   {"priority": priority}, False)
            await scheduler.forward(model.parse(request))
            finished.append(priority)

        tasks = [asyncio.ensure_future(one(p)) for p in (7, 0, 3, 12, 1)]  # 0 = the default level, 10
        await asyncio.sleep(0.2)
        gate.set()
        await blocker
        await asyncio.gather(*tasks)
        await scheduler.close()
        return finished

    assert asyncio.run(main()) == [1, 3, 7, 0, 12]


def test_restricted_header_and_tls(tiny_checkpoint, tmp_path) -> None:
    trustme = pytest.importorskip("trustme", reason="trustme makes the test certificate (pip install '.[test]')")
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    secret = "s3cr3t-value"
    with ServerProcess(f"tiny={tiny_checkpoint}", "--backend", "torch", "--device", "cpu", "--restricted-header",
                       "X-Api-Key", "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
                       env={"REFORMER_RT_RESTRICTED_HEADER_VALUE": secret}) as server:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

        def get(path: str, headers: dict[str, str], port: str = "http") -> int:
            connection = http.client.HTTPSConnection("127.0.0.1", server.ports[port], context=context, timeout=30)
            connection.request("GET", path, headers=headers)
            status = connection.getresponse().status
            connection.close()
            return status

        assert get("/v2/health/ready", {}) == 200  # health needs no key
        assert get("/v2/models/tiny", {}) == 401
        assert get("/v2/models/tiny", {"X-Api-Key": "wrong"}) == 403
        assert get("/v2/models/tiny", {"X-Api-Key": secret}) == 200
        assert get("/metrics", {}, "metrics") == 401 and get("/metrics", {"x-api-key": secret}, "metrics") == 200
        client = httpclient.InferenceServerClient(server.http, ssl=True,
                                                  ssl_context_factory=lambda: context)
        ids = httpclient.InferInput("input_ids", [1, 4], "INT64")
        ids.set_data_from_numpy(np.array([[3, 4, 5, 6]], dtype=np.int64))
        assert client.infer("tiny", [ids], headers={"X-Api-Key": secret}).as_numpy("logits").shape == (1, 4, 258)
        grpc = grpcclient.InferenceServerClient(server.grpc, ssl=True, root_certificates=str(tmp_path / "ca.pem"))
        assert grpc.is_server_live()
        with pytest.raises(InferenceServerException, match="needs the X-Api-Key header"):
            grpc.get_model_metadata("tiny")
        assert grpc.get_model_metadata("tiny", headers={"x-api-key": secret}).name == "tiny"
        with pytest.raises(ssl.SSLError):  # plain HTTP is not served
            ssl.create_default_context().wrap_socket(socket.create_connection(("127.0.0.1", server.ports["http"])),
                                                     server_hostname="127.0.0.1")
    assert secret not in server.log


@pytest.fixture
def package_logger() -> Iterator[None]:
    """``serve`` points the package's logger at stderr for the rest of its process; in-process, only for the test."""
    logger = logging.getLogger("reformer_rt")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate = handlers, propagate
    logger.setLevel(level)


STARTUP_MISTAKES = [
    (["/no/such/model"], "does not exist"),
    (["--config", "{config}"], "unknown keys ['http-port']"),
    (["--http-port", "70000"], "expected a port in 0..65535"),
    (["--tls-cert", "c.pem"], "expected both"),
    (["--restricted-header", "=x"], "non-empty name"),
    (["a=/no/such", "a=/no/such"], "given twice"),
    (["--ray", "--tls-cert", "c", "--tls-key", "k"], "terminate TLS in front"),
    (["--ray", "--autoscale", "3:1"], "expected MIN:MAX"),
    (["--ray", "--max-replicas-per-node", "0"], "--max-replicas-per-node: got 0; expected >= 1"),
    (["--ray", "--no-batching"], "not supported"),
]


@pytest.mark.parametrize("args,words", STARTUP_MISTAKES)
def test_startup_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, capsys, package_logger, args, words) -> None:
    """In process (a real one: ``test_a_startup_mistake_in_a_real_process``). Each mistake is found before a model
    is opened: without models the demo is served, which the ``auto`` backend would first export to the cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"http-port": 1}))
    result = in_process(["serve", *[a.format(config=config) for a in args]], capsys)
    assert result.returncode == 2, result.stderr
    assert words in one_error_line("serve", result.stderr)
    assert not (tmp_path / "cache").exists()


def test_a_startup_mistake_in_a_real_process() -> None:
    result = real_process("serve", "/no/such/model", timeout=120)
    assert result.returncode == 2 and "does not exist" in one_error_line("serve", result.stderr)


def test_port_in_use_exits_2(tiny_checkpoint) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = real_process("serve", f"tiny={tiny_checkpoint}", "--backend", "torch", "--http-port", str(port),
                              "--grpc-port", "0", "--metrics-port", "0", timeout=120)
    assert result.returncode == 2 and "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_without_models_the_demo_is_served_and_sigint_stops_it(tmp_path) -> None:
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"backend": "torch", "device": "cpu", "max_queue_delay_us": 100}))
    with ServerProcess("--config", str(config)) as server:
        client = httpclient.InferenceServerClient(server.http)
        assert [m["name"] for m in client.get_model_repository_index()] == ["demo"]
        assert "max length 131072" in server.log and "queue delay 100 us" in server.log
        server.process.send_signal(2)  # SIGINT
        assert server.wait(60) == 0


@pytest.mark.slow
def test_bench_serve_sweeps_both_modes_and_writes_its_report(tiny_checkpoint, tmp_path) -> None:
    """The benchmark command end to end on a tiny workload (its figures are not checked: benchmarks, not tests)."""
    result = real_process("bench", "serve", str(tiny_checkpoint), "--backend", "torch", "--concurrency", "1,3",
                          "--requests", "6", "--lengths", "20-200", "--overhead-length", "256", "--overhead-repeat",
                          "2", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "serve.json").read_text())["points"]
    assert [(r["mode"], r["concurrency"], r["ok"]) for r in rows] == [
        ("batching on", 1, 6), ("batching on", 3, 6), ("batching off", 1, 6), ("batching off", 3, 6)]
    assert (tmp_path / "serve.csv").read_text().startswith("mode,protocol,concurrency")
    assert (tmp_path / "serve.png").stat().st_size > 0 and "server overhead at concurrency 1" in result.stdout
