"""The KServe v2 HTTP/REST endpoints, defined once for every HTTP stack: ``handle(host, method, path, headers,
read_body)`` -> ``HttpReply``, over any ``Host`` (``host.py``) and its model services (``service.py``). aiohttp
(``http_api.py``, behind ``reformer-rt serve``) and Starlette (the Ray Serve deployment, ``ray_serve.py``) only move
bytes in and out.

| method | path                                               | answer                                       |
|--------|----------------------------------------------------|----------------------------------------------|
| GET    | /v2/health/live, /v2/health/ready                  | 200, or 503 (not ready / draining)           |
| GET    | /v2, /v2/                                          | server metadata                              |
| GET    | /v2/models/NAME[/versions/V]                       | model metadata                               |
| GET    | /v2/models/NAME[/versions/V]/ready                 | 200, or 503                                  |
| GET    | /v2/models/NAME[/versions/V]/config                | Triton model config (JSON of its protobuf)   |
| GET    | /v2/models[/NAME[/versions/V]]/stats               | Triton statistics extension                  |
| POST   | /v2/models/NAME[/versions/V]/infer                 | infer (JSON or binary tensors)               |
| POST   | /v2/models/NAME[/versions/V]/generate              | generate extension: new tokens, JSON         |
| POST   | /v2/models/NAME[/versions/V]/generate_stream       | the same as server-sent events, per token    |
| POST   | /v2/repository/index                               | the served models (read-only repository)     |

Every error is ``{"error": "..."}`` with its status (``protocol.error_status``), a 503 that may pass carries
``Retry-After``; the restricted header, when the host has one, is checked on every path but the health checks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from .generating import sse_event
from .host import Host
from .protocol import (
    HEADER_LENGTH, JSON_TYPE, BadRequest, decode_http_request, encode_http_response, error_body, error_status,
)

log = logging.getLogger("reformer_rt.serve")

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
SSE_TYPE = "text/event-stream"
ReadBody = Callable[[], Awaitable[bytes]]


@dataclasses.dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    compressible: bool = False  # an infer response: the stack may compress it when the client accepts
    stream: AsyncIterator[bytes] | None = None  # sent after ``body``, chunk by chunk, as it comes


def _json(data: Any, status: int = 200) -> HttpReply:
    return HttpReply(status, json.dumps(data).encode(), {"Content-Type": JSON_TYPE})


def error_reply(exc: BaseException) -> HttpReply:
    status = error_status(exc)
    headers = {"Content-Type": JSON_TYPE}
    if status.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(status.retry_after_s)))
    return HttpReply(status.http_status, error_body(status.message), headers)


# ------------------------------------------------------------------------------------------------- handlers
Match = dict[str, str]
Handler = Callable[[Host, Match, Mapping[str, str], ReadBody], Awaitable[HttpReply]]


async def _live(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    return HttpReply(200 if host.live else 503)


async def _ready(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    return HttpReply(200 if host.ready else 503)


async def _server_metadata(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    return _json(host.server_metadata())


async def _model_metadata(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    return _json(host.service(match["model"], match["version"]).metadata())


async def _model_ready(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    return HttpReply(200 if host.service(match["model"], match["version"]).ready and host.ready else 503)


async def _model_config(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    from google.protobuf import json_format

    config = host.service(match["model"], match["version"]).config()
    return _json(json_format.MessageToDict(config, preserving_proto_field_name=True))


async def _stats(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    return _json({"model_stats": host.statistics(match.get("model") or "", match.get("version") or "")})


async def _infer(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    name, version = match["model"], match["version"]
    service = host.service(name, version)  # an unknown model is a 404 before the body is read
    body = await read()
    result = await service.infer(lambda: decode_http_request(body, headers.get(HEADER_LENGTH), name, version))
    payload, reply_headers = encode_http_response(result)
    return HttpReply(200, payload, reply_headers, compressible=True)


async def _generate(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    service = host.service(match["model"], match["version"])
    return _json(await service.generate(await read()))


async def _generate_stream(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    """Server-sent events: the first token is awaited here, so a bad request still gets its 4xx; an error after
    that arrives as a last event ``data: {"error": ...}``."""
    service = host.service(match["model"], match["version"])
    events = service.generate_stream(await read())
    first = await anext(events)

    async def rest() -> AsyncIterator[bytes]:
        try:
            async for generated in events:
                yield sse_event(service.model, generated)
        except Exception as exc:  # the status line is gone: the error becomes the stream's last event
            status = error_status(exc)
            if status.internal:
                log.error("generate_stream failed", exc_info=exc)
            yield f"data: {json.dumps({'error': status.message})}\n\n".encode()
        finally:
            await events.aclose()

    return HttpReply(200, sse_event(service.model, first), {"Content-Type": SSE_TYPE, "Cache-Control": "no-cache"},
                     stream=rest())


async def _repository_index(host: Host, match: Match, headers: Mapping[str, str], read: ReadBody) -> HttpReply:
    body = await read()
    try:
        options = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise BadRequest(f"repository index: body is not JSON ({exc})") from exc
    if not isinstance(options, dict):
        raise BadRequest('repository index: expected a JSON object such as {"ready": true}')
    return _json(host.repository_index())


_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
ROUTES: tuple[tuple[str, re.Pattern[str], Handler], ...] = tuple((method, re.compile(pattern), handler) for
                                                                   method, pattern, handler in (
    ("GET", r"/v2/health/live", _live),
    ("GET", r"/v2/health/ready", _ready),
    ("GET", r"/v2/?", _server_metadata),
    ("GET", r"/v2/models/stats", _stats),
    ("POST", r"/v2/repository/index", _repository_index),
    ("GET", _MODEL, _model_metadata),
    ("GET", _MODEL + r"/ready", _model_ready),
    ("GET", _MODEL + r"/config", _model_config),
    ("GET", _MODEL + r"/stats", _stats),
    ("POST", _MODEL + r"/infer", _infer),
    ("POST", _MODEL + r"/generate", _generate),
    ("POST", _MODEL + r"/generate_stream", _generate_stream),
))


async def handle(host: Host, method: str, path: str, headers: Mapping[str, str], read_body: ReadBody) -> HttpReply:
    """The reply to one HTTP request; never raises (a bug becomes a logged 500)."""
    matched = [(m, match, handler) for m, pattern, handler in ROUTES if (match := pattern.fullmatch(path))]
    chosen = next(((match, handler) for m, match, handler in matched if m == method), None)
    if chosen is None:
        status = 405 if matched else 404
        reason = "Method Not Allowed" if matched else "Not Found"
        return HttpReply(status, error_body(f"{reason}: {method} {path}"), {"Content-Type": JSON_TYPE})
    match, handler = chosen
    groups = {key: value or "" for key, value in match.groupdict().items()}
    try:
        if path not in HEALTH_PATHS:
            host.check_access(headers)
        return await handler(host, groups, headers, read_body)
    except Exception as exc:  # mapped by error_status; a bug is logged with its traceback
        if error_status(exc).internal:
            log.error("%s %s failed", method, path, exc_info=exc)
        return error_reply(exc)
