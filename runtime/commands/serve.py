"""``reformer-rt serve``: the KServe v2 inference server (HTTP/REST + gRPC + Prometheus metrics) over Sessions.

    reformer-rt serve                                   # the bundled demo model, as "demo"
    reformer-rt serve enwik8=ckpt/ small=model.onnx     # NAME=PATH (checkpoint directory, .onnx or engine)
    reformer-rt serve --config serve.json               # models and options from a JSON file

A bare PATH is named by its directory name or file stem. The config file is a JSON object: ``models`` maps names to
paths (or to objects with ``path``, ``backend``, ``device``, ``dtype``, ``quantize``), and any option below may be
given by its long name with underscores (``"max_queue_delay_us": 2000``); options on the command line win. The
server binds 127.0.0.1 unless ``--host`` says otherwise, logs one line per startup fact, is ready once every model
is loaded and warmed up, and drains on SIGTERM / SIGINT (exit 0). See ``reformer_rt.runtime.serving`` for the
protocol details.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from reformer_rt.export.metadata import QUANTIZE_SCHEMES
from reformer_rt.models import InputError, ReformerError
from reformer_rt.models.presets import demo_model_dir

from ..batching import DEFAULT_MAX_TOKENS
from ..serving.generating import DEFAULT_MAX_NEW_TOKENS_CAP
from ..serving.spec import ModelSpec, SessionDefaults, model_specs
from ..session import BACKENDS, DTYPES

log = logging.getLogger("reformer_rt.serve")

RESTRICTED_VALUE_ENV = "REFORMER_RT_RESTRICTED_HEADER_VALUE"
#: option -> (default, type) for everything a config file may set as well.
OPTIONS: dict[str, tuple[Any, type]] = {
    "host": ("127.0.0.1", str), "http_port": (8000, int), "grpc_port": (8001, int), "metrics_port": (8002, int),
    "backend": ("auto", str), "device": (None, str), "dtype": ("float32", str), "threads": (0, int),
    "max_queue_delay_us": (0, int), "max_tokens_per_batch": (DEFAULT_MAX_TOKENS, int), "max_queue_size": (1024, int),
    "default_priority": (10, int), "batching": (True, bool), "max_body_mb": (64, int),
    "restricted_header": (None, str), "tls_cert": (None, str), "tls_key": (None, str),
    "drain_timeout_s": (300.0, float), "access_log": (False, bool), "max_new_tokens": (DEFAULT_MAX_NEW_TOKENS_CAP, int),
    "quantize": (None, str),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve models over KServe v2 HTTP/gRPC (Triton-compatible clients)",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("models", nargs="*", metavar="[NAME=]PATH", help="models to serve (default: the demo model)")
    p.add_argument("--config", type=Path, help="JSON file with models and options")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, help="HTTP/REST port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 8002; 0 picks a free one)")
    p.add_argument("--backend", choices=BACKENDS, help="backend for every model (default auto)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="precision of the torch backend (default float32; float16 on a "
                   "GPU halves memory and time)")
    p.add_argument("--quantize", choices=QUANTIZE_SCHEMES, help="checkpoints on CPU: int8 weight products (torch: "
                   "its Linear layers; onnxruntime: an int8 export, made once); an int8 .onnx file needs no flag")
    p.add_argument("--threads", type=int, help="CPU threads per model (default: all)")
    p.add_argument("--max-queue-delay-us", type=int, help="longest wait to fill a batch (default 0)")
    p.add_argument("--max-tokens-per-batch", type=int, help=f"padded tokens per forward pass (default "
                   f"{DEFAULT_MAX_TOKENS})")
    p.add_argument("--max-queue-size", type=int, help="requests waiting per model before 503 (default 1024)")
    p.add_argument("--default-priority", type=int, help="priority of requests that give none; lower runs first "
                   "(default 10)")
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False,
                   help="run every request alone (its own sequences still share passes)")
    p.add_argument("--max-body-mb", type=int, help="request body cap in MiB (default 64; over it: 413)")
    p.add_argument("--max-new-tokens", type=int, help=f"the most new tokens one generate request may ask for (default "
                   f"{DEFAULT_MAX_NEW_TOKENS_CAP}; over it, or over the positions a prompt leaves: 400)")
    p.add_argument("--restricted-header", metavar="NAME[=VALUE]", help=f"require this header on every endpoint "
                   f"but health; without =VALUE the value comes from ${RESTRICTED_VALUE_ENV} (keeps it out of ps)")
    p.add_argument("--tls-cert", help="PEM certificate: serve HTTP, gRPC and metrics over TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--drain-timeout-s", type=float, help="how long SIGTERM waits for accepted requests (default 300)")
    p.add_argument("--access-log", action="store_const", const=True, help="log every HTTP request")
    ray = p.add_argument_group("Ray Serve (pip install \"reformer-rt[ray]\")")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of serving in this process")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas")
    ray.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS if set, else start a local one)")
    ray.add_argument("--max-ongoing-requests", type=int, help="requests a replica works on at once (Ray default)")
    ray.add_argument("--max-queued-requests", type=int, help="requests queued per caller before 503 (Ray default: "
                     "unlimited)")
    ray.add_argument("--max-replicas-per-node", type=int, help="at most N replicas on one node; 1 puts every replica "
                     "on its own node, so losing a node loses one replica (Ray default: no limit)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ settings
def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--config: cannot read {path} ({exc}); expected a JSON object") from exc
    if not isinstance(data, dict):
        raise InputError(f"--config: {path} holds {type(data).__name__}; expected a JSON object")
    unknown = sorted(set(data) - set(OPTIONS) - {"models"})
    if unknown:
        raise InputError(f"--config: unknown keys {unknown} in {path}; expected 'models' and {sorted(OPTIONS)}")
    return data


def _has_type(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool  # JSON true is not a port number
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every option: command line, else config file, else default; each checked for type."""
    config = _read_config(args.config)
    out: dict[str, Any] = {}
    for name, (default, kind) in OPTIONS.items():
        value = getattr(args, name, None)
        if value is None:
            value = config.get(name, default)
        if value is not None and not _has_type(value, kind):
            raise InputError(f"{name}: got {value!r}; expected {kind.__name__}")
        out[name] = value
    for name in ("http_port", "grpc_port", "metrics_port"):
        if not 0 <= out[name] <= 65535:
            raise InputError(f"--{name.replace('_', '-')}: got {out[name]}; expected a port in 0..65535")
    for name in ("max_tokens_per_batch", "max_queue_size", "max_body_mb", "max_new_tokens"):
        if out[name] < 1:
            raise InputError(f"--{name.replace('_', '-')}: got {out[name]}; expected >= 1")
    for name in ("max_queue_delay_us", "default_priority", "threads"):
        if out[name] < 0:
            raise InputError(f"--{name.replace('_', '-')}: got {out[name]}; expected >= 0")
    if (out["tls_cert"] is None) != (out["tls_key"] is None):
        raise InputError("--tls-cert / --tls-key: got one of them; expected both (a PEM certificate and its key)")
    out["models"] = model_specs(args.models, config.get("models"), ModelSpec("demo", str(demo_model_dir())),
                                where="--config")
    return out


def restricted_header(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    name, sep, secret = value.partition("=")
    if not sep:
        secret = os.environ.get(RESTRICTED_VALUE_ENV, "")
        if not secret:
            raise InputError(f"--restricted-header {name}: no value; give NAME=VALUE or set ${RESTRICTED_VALUE_ENV}")
    if not name.strip() or not secret:
        raise InputError("--restricted-header: expected NAME=VALUE with a non-empty name and value")
    return name.strip(), secret


# -------------------------------------------------------------------------------------------------- running
def log_to_stderr() -> None:
    """Our log lines on stderr, as they are; libraries keep their own (quiet) defaults."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("reformer_rt")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def session_defaults(config: dict[str, Any]) -> SessionDefaults:
    return SessionDefaults(config["backend"], config["device"], config["dtype"], config["threads"],
                           config["max_tokens_per_batch"], config["quantize"])


def run(args: argparse.Namespace) -> int:
    from ..serving import require_serve_extra

    require_serve_extra()
    log_to_stderr()
    config = settings(args)
    if args.ray:
        return serve_on_ray(args, config)
    from ..serving.model import ServedModel
    from ..serving.server import InferenceServer

    options = server_options(config)
    defaults = session_defaults(config)
    models, unavailable = [], {}
    for spec in config["models"]:
        try:
            session = spec.open(defaults)
        except ReformerError as exc:  # one model's mistake: the others still serve
            if len(config["models"]) == 1:
                raise
            log.error("reformer-rt serve: model %s = %s failed to load: %s", spec.name, spec.path, exc)
            unavailable[spec.name] = str(exc)
            continue
        log.info("reformer-rt serve: model %s = %s: backend %s (%s), device %s, max length %d, outputs %s", spec.name,
                 spec.path, session.backend, session.backend_reason, session.device, session.max_length,
                 ", ".join(session.outputs))
        models.append(ServedModel(spec.name, session))
    scheduler = options.scheduler
    log.info("reformer-rt serve: limits: %d padded tokens per batch, queue delay %d us, %d queued requests per "
             "model, body %d MiB, %d new tokens per generation, batching %s, default priority %d%s",
             scheduler.max_tokens_per_batch, scheduler.max_queue_delay_us, scheduler.max_queue_size,
             config["max_body_mb"], config["max_new_tokens"], "on" if scheduler.batching else "off",
             scheduler.default_priority,
             f", restricted header {options.restricted_header[0]}" if options.restricted_header else "")
    if not models:
        raise InputError(f"no model loaded: {'; '.join(f'{name}: {why}' for name, why in unavailable.items())}")
    return asyncio.run(_serve(InferenceServer(models, options, unavailable)))


def server_options(config: dict[str, Any]) -> Any:
    """``ServerOptions`` from the settings (``settings``)."""
    from ..serving.host import ListenerOptions
    from ..serving.scheduler import SchedulerOptions
    from ..serving.server import ServerOptions

    listeners = ListenerOptions(
        host=config["host"], http_port=config["http_port"], grpc_port=config["grpc_port"],
        metrics_port=config["metrics_port"], max_body_bytes=config["max_body_mb"] << 20,
        tls_cert=Path(config["tls_cert"]) if config["tls_cert"] else None,
        tls_key=Path(config["tls_key"]) if config["tls_key"] else None, access_log=config["access_log"])
    scheduler = SchedulerOptions(config["max_tokens_per_batch"], config["max_queue_delay_us"],
                                 config["max_queue_size"], config["default_priority"], config["batching"])
    return ServerOptions(listeners, scheduler, restricted_header(config["restricted_header"]),
                         config["drain_timeout_s"], generation_limits(config))


def generation_limits(config: dict[str, Any]) -> Any:
    from ..serving.generating import GenerationLimits

    return GenerationLimits(config["max_new_tokens"])


def listeners(options: Any) -> list[Any]:
    """The transports of ``reformer-rt serve``, each started over the server as its host: HTTP/REST (aiohttp),
    gRPC (grpc.aio) and Prometheus metrics."""
    from ..serving.grpc_api import start_grpc
    from ..serving.http_api import start_http, start_metrics

    bind = options.listeners
    return [("http", lambda server: start_http(server, bind)), ("grpc", lambda server: start_grpc(server, bind)),
            ("metrics", lambda server: start_metrics(server, server.metrics, bind))]


def _scaling(args: Any) -> dict[str, Any]:
    """Deployment options from ``--replicas`` / ``--autoscale`` / ``--max-ongoing-requests`` /
    ``--max-queued-requests`` / ``--max-replicas-per-node``."""
    out: dict[str, Any] = {}
    if args.autoscale:
        low, sep, high = args.autoscale.partition(":")
        if not (sep and low.isdigit() and high.isdigit() and 0 <= int(low) <= int(high) and int(high) >= 1):
            raise InputError(f"--autoscale: got {args.autoscale!r}; expected MIN:MAX replicas, such as 1:4")
        out["autoscaling_config"] = {"min_replicas": int(low), "max_replicas": int(high)}
    else:
        replicas = 1 if args.replicas is None else args.replicas
        if replicas < 1:
            raise InputError(f"--replicas: got {replicas}; expected >= 1")
        out["num_replicas"] = replicas
    for name in ("max_ongoing_requests", "max_queued_requests", "max_replicas_per_node"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise InputError(f"--{name.replace('_', '-')}: got {value}; expected >= 1")
            out[name] = value
    return out


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve_on_ray(args: Any, config: dict[str, Any]) -> int:
    """``reformer-rt serve --ray``: deploy on a local Ray cluster (or join ``--address`` / ``$RAY_ADDRESS``), serve
    until SIGTERM or SIGINT, then remove the application (and stop the cluster this command started)."""
    import signal
    import threading

    from ..serving.ray_serve import APP_NAME, RayServeOptions, deployment

    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Serve ({exc}): pip install \"reformer-rt[ray]\"") from exc
    if config["tls_cert"]:
        raise InputError("--tls-cert with --ray: Ray Serve's HTTP proxy does not take this certificate; terminate "
                         "TLS in front of it (a load balancer or ingress), or serve without --ray")
    if not config["batching"]:
        raise InputError("--no-batching with --ray: not supported; set --max-queue-delay-us 0 for the shortest "
                         "batching delay")
    defaults = dataclasses.replace(session_defaults(config), threads=config["threads"] or 1)
    options = RayServeOptions(tuple(config["models"]), defaults, config["max_queue_delay_us"] / 1e6,
                              config["max_body_mb"] << 20, restricted_header(config["restricted_header"]),
                              generation_limits(config))
    scaling = _scaling(args)
    port = config["http_port"] or _free_port(config["host"])
    # Never the address a past `ray start` left in /tmp/ray, which ray.init(address=None) would join: this command
    # would then take that cluster for its own and shut its Serve down on exit.
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    started = address == "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    log.info("reformer-rt serve: Ray %s cluster %s, %s", ray.__version__,
             "local (started here)" if started else address, ", ".join(f"{k}={v}" for k, v in scaling.items()))
    serve.start(http_options={"host": config["host"], "port": port})
    serve.run(deployment(options, **scaling).bind(options), name=APP_NAME, route_prefix="/")
    log.info("reformer-rt serve: HTTP/REST (KServe v2, Ray Serve) on http://%s:%d", config["host"], port)
    log.info("reformer-rt serve: ready (%s)", ", ".join(sorted(spec.name for spec in options.models)))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("reformer-rt serve: signal received; removing the application")
    serve.delete(APP_NAME)
    if started:
        serve.shutdown()
        ray.shutdown()
    log.info("reformer-rt serve: stopped")
    return 0


async def _serve(server: Any) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await server.start(listeners(server.options))
    except OSError as exc:
        await server.stop()
        raise InputError(f"cannot listen ({exc.strerror or exc}); choose free ports (--http-port/--grpc-port/"
                         "--metrics-port, 0 picks one) or stop what holds them") from exc
    await stopping.wait()
    log.info("reformer-rt serve: signal received")
    await server.stop()
    return 0
