"""The HTTP/REST listener of ``reformer-rt serve`` (aiohttp) and its Prometheus metrics listener.

The endpoints themselves are ``routes.py``, over any ``Host``; this module moves bytes: the request body is read
under the listener's cap (over it: 413 with a JSON error), gzip/deflate request bodies are decompressed by aiohttp,
infer responses are compressed when the client accepts it, and the listeners start and stop with their host.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from .host import Host, ListenerOptions
from .metrics import CONTENT_TYPE, Metrics
from .protocol import PayloadTooLarge
from .routes import error_reply, handle

log = logging.getLogger("reformer_rt.serve")


def make_app(host: Host, max_body_bytes: int) -> web.Application:
    async def dispatch(request: web.Request) -> web.StreamResponse:
        async def read_body() -> bytes:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise PayloadTooLarge(f"request body over {max_body_bytes:,} bytes; send fewer or shorter "
                                      "sequences per request") from None

        reply = await handle(host, request.method, request.path, request.headers, read_body)
        if reply.stream is not None:
            return await _stream(request, reply.status, reply.headers, reply.body, reply.stream)
        response = web.Response(body=reply.body, status=reply.status, headers=reply.headers)
        if reply.compressible and any(c in request.headers.get("Accept-Encoding", "") for c in ("gzip", "deflate")):
            response.enable_compression()
        return response

    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def _stream(request: web.Request, status: int, headers: dict[str, str], first: bytes,
                  rest: AsyncIterator[bytes]) -> web.StreamResponse:
    """A chunked response written as its pieces come; a client that goes away ends the source (and so the
    generation behind it)."""
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    try:
        await response.write(first)
        async for chunk in rest:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left; closing ``rest`` below stops its work
    finally:
        await rest.aclose()
    return response


class _Site:
    """An aiohttp runner and site with the ``port`` and ``stop()`` a host's lifecycle expects."""

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


def tls_context(options: ListenerOptions) -> ssl.SSLContext | None:
    """The server side of TLS for the HTTP and metrics listeners (None: plain HTTP)."""
    if options.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(options.tls_cert), str(options.tls_key))
    return context


async def start_http(host: Host, options: ListenerOptions) -> _Site:
    return await _serve(make_app(host, options.max_body_bytes), options.host, options.http_port, tls_context(options),
                        options.access_log, "HTTP/REST (KServe v2)")


async def start_metrics(host: Host, metrics: Metrics, options: ListenerOptions) -> _Site:
    """``GET /metrics``: Prometheus text exposition, behind the host's access control."""
    async def exposition(request: web.Request) -> web.Response:
        try:
            host.check_access(request.headers)
        except Exception as exc:  # 401 / 403
            reply = error_reply(exc)
            return web.Response(body=reply.body, status=reply.status, headers=reply.headers)
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.add_routes([web.get("/metrics", exposition)])
    return await _serve(app, options.host, options.metrics_port, tls_context(options), False, "metrics (Prometheus)")
