"""``reformer-rt bench serve``: load a KServe v2 server with tritonclient and report what perf_analyzer reports.

    reformer-rt bench serve                          # the demo model, served here twice: batching on, then off
    reformer-rt bench serve ckpt/ --backend torch    # another model
    reformer-rt bench serve --url 10.0.0.5:8000 --model-name enwik8   # a running server (ours, Triton, KServe)

For each concurrency level (``--concurrency 1,4,16,64``) that many client threads, each with its own tritonclient
client (HTTP binary tensors, or ``--protocol grpc``), send ``--requests`` requests in all; each request is one
sequence of a length drawn uniformly from ``--lengths MIN-MAX`` (seeded) and asks for ``--output``. Reported per
point: infer/s, p50/p90/p95/p99 latency, tokens/s, and every failure by kind (5xx, other HTTP/gRPC error, lost:
no answer). When the bench starts the server itself it also measures the server's overhead at concurrency 1:
median latency of ``--overhead-length``-token requests against ``Session.run`` of the same input in this process
on the same backend. Writes ``serve.csv``, ``serve.json`` and ``serve.png`` to ``--out``; exits 1 if any request
failed with a 5xx or was lost.

Like every bench report, ``serve.json`` starts with the machine, the date, Python and the library versions; the
``--out`` check, that header, the table and the plot are the benchmarks' shared harness (``bench/harness.py``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from reformer_rt.models import InputError

from ..artifacts import write_files_atomic
from ..session import BACKENDS
from .harness import Panel, Provenance, json_bytes, line_plot, make_out_dir, markdown_table, parse_ints

PERCENTILES = (50, 90, 95, 99)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="concurrency sweep against a KServe v2 server",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", nargs="?", type=Path, help="model to serve here (default: the demo model)")
    p.add_argument("--url", help="HOST:PORT of a running server (HTTP port, or gRPC with --protocol grpc)")
    p.add_argument("--model-name", help="model to call on --url (default: the server's first)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="backend of the server started here")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    p.add_argument("--lengths", default="512-4096", help="MIN-MAX tokens per request (uniform)")
    p.add_argument("--output", default="last_logits", help="output each request asks for")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="batching delay of the server started here")
    p.add_argument("--overhead-length", type=int, default=4096, help="request length of the overhead measurement")
    p.add_argument("--overhead-repeat", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.set_defaults(func=run)


@dataclasses.dataclass
class LoadPoint:
    """One concurrency level of a sweep: request counts by outcome and latencies (not a ``harness.Point``: a level
    is many requests of drawn lengths, measured as a distribution)."""

    mode: str
    protocol: str
    concurrency: int
    requests: int
    ok: int = 0
    errors_5xx: int = 0
    errors_other: int = 0
    lost: int = 0
    wall_s: float = 0.0
    tokens: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        return {"mode": self.mode, "protocol": self.protocol, "concurrency": self.concurrency,
                "requests": self.requests, "ok": self.ok, "errors_5xx": self.errors_5xx,
                "errors_other": self.errors_other, "lost": self.lost, "wall_s": round(self.wall_s, 3),
                "infer_per_s": round(self.ok / self.wall_s, 2) if self.wall_s else 0.0,
                "tokens_per_s": round(self.tokens / self.wall_s) if self.wall_s else 0,
                **{f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in PERCENTILES}}


# ---------------------------------------------------------------------------------------------------- clients
class _Client:
    """One tritonclient client (not thread-safe: one per thread) sending one-sequence requests."""

    def __init__(self, protocol: str, url: str, model: str, output: str) -> None:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
        self.module, self.model, self.protocol = module, model, protocol
        self.client = module.InferenceServerClient(url, network_timeout=600.0) if protocol == "http" else \
            module.InferenceServerClient(url)
        self.outputs = [module.InferRequestedOutput(output)]

    def infer(self, ids: np.ndarray) -> None:
        tensor = self.module.InferInput("input_ids", [1, len(ids)], "INT64")
        tensor.set_data_from_numpy(ids[None])
        self.client.infer(self.model, [tensor], outputs=self.outputs)

    def close(self) -> None:
        self.client.close()


def _classify(exc: Exception) -> str:
    """'5xx', 'other' (an answered error) or 'lost' (no answer: connection dropped, timed out)."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(exc, InferenceServerException) or exc.status() is None:
        return "lost"
    status = str(exc.status())
    if status.isdigit():
        return "5xx" if status.startswith("5") else "other"
    return "5xx" if any(code in status for code in ("INTERNAL", "UNAVAILABLE", "UNKNOWN")) else \
        "lost" if "DEADLINE" in status else "other"


def run_point(mode: str, protocol: str, url: str, model: str, output: str, concurrency: int,
              requests: list[np.ndarray]) -> LoadPoint:
    point = LoadPoint(mode, protocol, concurrency, len(requests))
    lock, cursor = threading.Lock(), iter(range(len(requests)))
    clients = [_Client(protocol, url, model, output) for _ in range(concurrency)]

    def worker(client: _Client) -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                client.infer(requests[index])
                kind = None
            except Exception as exc:  # every failure is counted by kind, none ends the sweep
                kind = _classify(exc)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                if kind is None:
                    point.ok += 1
                    point.tokens += len(requests[index])
                    point.latencies_ms.append(elapsed)
                else:
                    field = {"5xx": "errors_5xx", "other": "errors_other", "lost": "lost"}[kind]
                    setattr(point, field, getattr(point, field) + 1)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    point.wall_s = time.perf_counter() - started
    for client in clients:
        client.close()
    return point


# ------------------------------------------------------------------------------------------------------ sweeps
def _lengths(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise InputError(f"--lengths: got {text!r}; expected MIN-MAX tokens such as 512-4096") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise InputError(f"--lengths: got {text!r}; expected 1 <= MIN <= MAX")
    return bounds


def _workload(count: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(lengths[0], lengths[1] + 1)), dtype=np.int64)
            for _ in range(count)]


def _describe(protocol: str, url: str, model: str | None) -> tuple[str, int, int]:
    """The model's name, vocabulary size and maximum length, from its metadata and config."""
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    client = module.InferenceServerClient(url)
    try:
        if model is None:
            index = client.get_model_repository_index()
            names = [m["name"] for m in index] if protocol == "http" else [m.name for m in index.models]
            if not names:
                raise InputError(f"--url {url}: the server lists no models")
            model = names[0]
        meta = client.get_model_metadata(model, as_json=True) if protocol == "grpc" else client.get_model_metadata(
            model)
        config = client.get_model_config(model, as_json=True) if protocol == "grpc" else client.get_model_config(
            model)
    finally:
        client.close()
    config = config.get("config", config)
    vocab = next((int(o["shape"][-1]) for o in meta["outputs"] if o["name"] in ("logits", "last_logits")), 256)
    max_length = int(config.get("parameters", {}).get("max_length", {}).get("string_value", 1 << 30))
    return model, vocab, max_length


def sweep(mode: str, args: argparse.Namespace, url: str, levels: list[int]) -> tuple[list[LoadPoint], str, int]:
    model, vocab, max_length = _describe(args.protocol, url, args.model_name)
    lengths = _lengths(args.lengths)
    if lengths[1] > max_length:
        raise InputError(f"--lengths: up to {lengths[1]} tokens; model {model!r} takes at most {max_length}")
    points = []
    for level in levels:
        requests = _workload(args.requests, lengths, vocab, args.seed + level)
        run_point(mode, args.protocol, url, model, args.output, level, requests[:max(1, level)])  # warm-up
        points.append(run_point(mode, args.protocol, url, model, args.output, level, requests))
        print(json.dumps(points[-1].row()), flush=True)
    return points, model, vocab


def _server_seconds(metrics_url: str, model: str) -> tuple[float, float]:
    """(successful requests, cumulative compute microseconds) of ``model`` from the server's Prometheus metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()

    def value(family: str) -> float:
        match = re.search(rf'^{family}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("nv_inference_request_success"), value("nv_inference_compute_infer_duration_us")


def overhead(args: argparse.Namespace, model_path: Path, url: str, metrics_url: str, model: str,
             vocab: int) -> dict[str, Any]:
    """The server's overhead at concurrency 1 on ``--overhead-length``-token requests, two ways:

    * over its own forward passes: mean client latency against the mean compute time the server reports for the
      same requests (``nv_inference_compute_infer_duration_us``) -- everything the server adds (HTTP or gRPC,
      decoding, queueing, reducing outputs, encoding) plus the client, free of run-to-run noise;
    * against ``Session.run`` of the same input in this process, same backend: medians of blocks timed in process,
      through the server, in process again (not alternately: a CPU backend's thread pool keeps spinning a while
      after each run and would slow the other process). On a shared CPU this comparison carries the machine's
      noise between processes (about 10 % here)."""
    from ..session import Session

    ids = _workload(1, (args.overhead_length, args.overhead_length), vocab, args.seed)[0]
    session = Session(model_path, backend=args.backend)
    client = _Client(args.protocol, url, model, args.output)

    def block(call, warm: bool = True) -> list[float]:
        if warm:
            call()
        times = []
        for _ in range(args.overhead_repeat):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        return times

    try:
        local = block(lambda: session.run([ids], outputs=[args.output]))
        client.infer(ids)  # warm-up, outside the metrics window
        before = _server_seconds(metrics_url, model)
        served = block(lambda: client.infer(ids), warm=False)
        after = _server_seconds(metrics_url, model)
        local += block(lambda: session.run([ids], outputs=[args.output]))
    finally:
        client.close()
    compute_ms = (after[1] - before[1]) / (after[0] - before[0]) / 1000
    served_mean = statistics.fmean(served)
    return {"length": args.overhead_length, "backend": session.backend, "in_process_ms": statistics.median(local),
            "server_ms": statistics.median(served), "server_mean_ms": served_mean, "server_compute_ms": compute_ms,
            "overhead_vs_own_compute": served_mean / compute_ms - 1.0,
            "overhead_vs_in_process": statistics.median(served) / statistics.median(local) - 1.0}


# ------------------------------------------------------------------------------------------------------ report
def write_report(out: Path, points: list[LoadPoint], extra: dict[str, Any]) -> list[str]:
    """serve.csv, serve.json and (with matplotlib) serve.png under ``out``, written as one set."""
    rows = [p.row() for p in points]
    table_text = io.StringIO()
    writer = csv.DictWriter(table_text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files: dict[Path, bytes] = {out / "serve.csv": table_text.getvalue().encode(),
                                out / "serve.json": json_bytes({**extra, "points": rows})}
    image = _plot(rows, extra)
    if image is not None:
        files[out / "serve.png"] = image
    write_files_atomic(files, label="--out")
    return [str(path) for path in files]


def _plot(rows: list[dict[str, Any]], extra: dict[str, Any]) -> bytes | None:
    """Throughput and p95 latency against concurrency per mode, as PNG bytes (None without matplotlib)."""
    modes = dict.fromkeys(r["mode"] for r in rows)
    series = {key: {m: [(r["concurrency"], r[key]) for r in rows if r["mode"] == m] for m in modes}
              for key in ("infer_per_s", "p95_ms")}
    return line_plot([Panel(series["infer_per_s"], "concurrent clients", "infer/s", "throughput", yscale="linear"),
                      Panel(series["p95_ms"], "concurrent clients", "p95 latency (ms)", "latency")],
                     f"reformer-rt bench serve on {extra['machine']} ({extra['protocol']}, lengths {extra['lengths']})",
                     size=(11, 4.2))


def table(points: list[LoadPoint]) -> str:
    rows = [p.row() for p in points]
    return markdown_table(
        ("mode", "clients", "requests", "ok", "5xx", "other", "lost", "infer/s", "tokens/s", "p50 ms", "p90 ms",
         "p95 ms", "p99 ms"),
        [(r["mode"], r["concurrency"], r["requests"], r["ok"], r["errors_5xx"], r["errors_other"], r["lost"],
          f"{r['infer_per_s']:.1f}", f"{r['tokens_per_s']:,}",
          *(f"{r[f'p{q}_ms']:.1f}" for q in PERCENTILES)) for r in rows])


def run(args: argparse.Namespace) -> int:
    from ..serving import require_serve_extra
    from .server_process import ServeProcess

    require_serve_extra()

    levels = parse_ints(args.concurrency, "--concurrency")
    if args.requests < 1:
        raise InputError(f"--requests: got {args.requests}; expected >= 1")
    _lengths(args.lengths)
    make_out_dir(args.out)
    extra: dict[str, Any] = {**dataclasses.asdict(Provenance.here()), "protocol": args.protocol,
                             "lengths": args.lengths, "output": args.output}
    points: list[LoadPoint] = []
    if args.url:
        points, model, _ = sweep("server", args, args.url, levels)
        extra["model"] = model
    else:
        from reformer_rt.models.presets import demo_model_dir

        model_path = args.model or demo_model_dir()
        extra["model"] = str(model_path)
        base = [f"m={model_path}", "--backend", args.backend]
        for mode, flags in (("batching on", ["--max-queue-delay-us", str(args.max_queue_delay_us)]),
                            ("batching off", ["--no-batching"])):
            with ServeProcess([*base, *flags]) as server:
                url = server.http if args.protocol == "http" else server.grpc
                swept, model, vocab = sweep(mode, args, url, levels)
                points += swept
                if mode == "batching on" and args.overhead_repeat > 0:
                    metrics_url = f"http://127.0.0.1:{server.ports['metrics']}/metrics"
                    extra["overhead"] = overhead(args, model_path, url, metrics_url, model, vocab)
                    print(json.dumps({"overhead": extra["overhead"]}), flush=True)
    written = write_report(args.out, points, extra)
    print(f"\nmachine: {extra['machine']}, {extra['date']}; {args.protocol}; lengths {args.lengths}; "
          f"output {args.output}\n\n{table(points)}\n")
    if "overhead" in extra:
        o = extra["overhead"]
        print(f"server overhead at concurrency 1, {o['length']} tokens ({o['backend']}): {o['server_mean_ms']:.1f} ms "
              f"per request against the {o['server_compute_ms']:.1f} ms forward pass it ran = "
              f"{o['overhead_vs_own_compute']:+.1%}; against Session.run in this process: median "
              f"{o['server_ms']:.1f} ms vs {o['in_process_ms']:.1f} ms = {o['overhead_vs_in_process']:+.1%} (includes "
              "the machine's noise between processes)")
    print("wrote " + ", ".join(written))
    failed = sum(p.errors_5xx + p.lost for p in points)
    return 1 if failed else 0
