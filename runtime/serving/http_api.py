"""HTTP/REST endpoints of the KServe v2 protocol (aiohttp), and the Prometheus metrics listener.

| method | path                                               | answer                                       |
|--------|----------------------------------------------------|----------------------------------------------|
| GET    | /v2/health/live, /v2/health/ready                  | 200, or 503 (not ready / draining)           |
| GET    | /v2                                                | server metadata                              |
| GET    | /v2/models/NAME[/versions/V]                       | model metadata                               |
| GET    | /v2/models/NAME[/versions/V]/ready                 | 200, or 503                                  |
| GET    | /v2/models/NAME[/versions/V]/config                | Triton model config (JSON of its protobuf)   |
| GET    | /v2/models[/NAME[/versions/V]]/stats               | Triton statistics extension                  |
| POST   | /v2/models/NAME[/versions/V]/infer                 | infer (JSON or binary tensors)               |
| POST   | /v2/repository/index                               | the served models (read-only repository)     |
| GET    | /metrics (metrics port)                            | Prometheus text exposition                   |

Every error is ``{"error": "..."}`` with its status (``protocol.error_status``); a body over the cap is 413; a
503 that may pass carries ``Retry-After``. Request bodies compressed with gzip/deflate are accepted (aiohttp
decompresses them) and responses are compressed when the client asks.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .protocol import (
    HEADER_LENGTH, JSON_TYPE, BadRequest, PayloadTooLarge, decode_http_request, encode_http_response, error_body,
    error_status,
)

if TYPE_CHECKING:
    from .server import InferenceServer

log = logging.getLogger("reformer_rt.serve")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type=JSON_TYPE)


def error_response(exc: BaseException) -> web.Response:
    status = error_status(exc)
    response = web.Response(body=error_body(status.message), status=status.http_status, content_type=JSON_TYPE)
    if status.retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(status.retry_after_s)))
    return response


def _middleware(server: InferenceServer) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Access control, and every failure as one JSON error (aiohttp's own 404/405/413 included)."""
        try:
            if request.path not in HEALTH_PATHS:
                server.check_access(request.headers)
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(PayloadTooLarge(f"request body over {server.options.max_body_bytes:,} bytes; "
                                                  "send fewer or shorter sequences per request"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.Response(body=error_body(f"{exc.reason}: {request.method} {request.path}"), status=exc.status,
                                content_type=JSON_TYPE)
        except Exception as exc:  # mapped by error_status; a bug is logged with its traceback
            if error_status(exc).internal:
                log.error("%s %s failed", request.method, request.path, exc_info=exc)
            return error_response(exc)

    return guard


def _model_routes(path: str, handler: Handler, method: str = "GET") -> list[web.RouteDef]:
    """The same handler with and without ``/versions/{version}``."""
    return [web.route(method, f"/v2/models/{{model}}{path}", handler),
            web.route(method, f"/v2/models/{{model}}/versions/{{version}}{path}", handler)]


def make_app(server: InferenceServer) -> web.Application:
    def model_of(request: web.Request):
        return server.entry(request.match_info["model"], request.match_info.get("version", ""))

    async def live(request: web.Request) -> web.Response:
        return web.Response(status=200 if server.live else 503)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if server.ready else 503)

    async def metadata(request: web.Request) -> web.Response:
        return _json(server.server_metadata())

    async def model_metadata(request: web.Request) -> web.Response:
        return _json(model_of(request).model.metadata())

    async def model_ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if model_of(request).ready and server.ready else 503)

    async def model_config(request: web.Request) -> web.Response:
        from google.protobuf import json_format

        config = model_of(request).model.config()
        return _json(json_format.MessageToDict(config, preserving_proto_field_name=True))

    async def stats(request: web.Request) -> web.Response:
        name = request.match_info.get("model", "")
        return _json({"model_stats": server.statistics(name, request.match_info.get("version", ""))})

    async def infer(request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version", "")
        server.entry(name, version)  # an unknown model is a 404 before the body is read
        body = await request.read()
        result = await server.infer(name, version, lambda: decode_http_request(
            body, request.headers.get(HEADER_LENGTH), name, version))
        payload, headers = encode_http_response(result)
        response = web.Response(body=payload, headers=headers)
        if "gzip" in request.headers.get("Accept-Encoding", "") or "deflate" in request.headers.get(
                "Accept-Encoding", ""):
            response.enable_compression()
        return response

    async def repository_index(request: web.Request) -> web.Response:
        if request.can_read_body:
            try:
                options = json.loads(await request.read() or b"{}")
            except json.JSONDecodeError as exc:
                raise BadRequest(f"repository index: body is not JSON ({exc})") from exc
            if not isinstance(options, dict):
                raise BadRequest("repository index: expected a JSON object such as {\"ready\": true}")
        return _json(server.repository_index())

    app = web.Application(client_max_size=server.options.max_body_bytes, middlewares=[_middleware(server)])
    app.add_routes([
        web.get("/v2/health/live", live), web.get("/v2/health/ready", ready), web.get("/v2", metadata),
        web.get("/v2/models/stats", stats), web.post("/v2/repository/index", repository_index),
        *_model_routes("", model_metadata), *_model_routes("/ready", model_ready),
        *_model_routes("/config", model_config), *_model_routes("/stats", stats),
        *_model_routes("/infer", infer, "POST"),
    ])
    return app


class _Site:
    """An aiohttp runner and site with the ``port`` and ``stop()`` the server's lifecycle expects."""

    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner
        self.port: int = runner.addresses[0][1]  # the bound port (a requested 0 picks a free one)

    async def stop(self) -> None:
        await self.runner.cleanup()


async def _serve(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None, access_log: bool,
                 what: str) -> _Site:
    runner = web.AppRunner(app, access_log=log if access_log else None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, reuse_address=True)
    await site.start()
    listener = _Site(runner)
    log.info("reformer-rt serve: %s on %s://%s:%d", what, "https" if tls else "http", host, listener.port)
    return listener


async def start_http(server: InferenceServer, tls: ssl.SSLContext | None) -> _Site:
    options = server.options
    return await _serve(make_app(server), options.host, options.http_port, tls, options.access_log,
                        "HTTP/REST (KServe v2)")


async def start_metrics(server: InferenceServer, tls: ssl.SSLContext | None) -> _Site:
    from .metrics import CONTENT_TYPE

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=server.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application(middlewares=[_middleware(server)])
    app.add_routes([web.get("/metrics", metrics)])
    return await _serve(app, server.options.host, server.options.metrics_port, tls, False, "metrics (Prometheus)")
