"""What the transports need from whatever hosts the model services, and what every host shares.

A host (``InferenceServer`` behind ``reformer-rt serve``, a Ray Serve replica) holds one ``ModelService`` per model
and owns lifecycle and access control; the transports (``routes.py`` for any HTTP stack, ``grpc_api.py``) reach
the services through the ``Host`` protocol only, so they never import a server. ``ListenerOptions`` are what the
listeners of ``reformer-rt serve`` bind and enforce.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .protocol import BadRequest, NotFound, PermissionDenied, Unauthenticated
from .service import ModelService

DEFAULT_MAX_BODY = 64 << 20  # Triton's default HTTP input cap


@dataclasses.dataclass(frozen=True)
class ListenerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_body_bytes: int = DEFAULT_MAX_BODY
    tls_cert: Path | None = None
    tls_key: Path | None = None
    access_log: bool = False


class Host(Protocol):
    live: bool
    ready: bool

    def check_access(self, headers: Mapping[str, str]) -> None:
        """Raise ``Unauthenticated`` / ``PermissionDenied`` unless ``headers`` may use the non-health endpoints."""
        ...

    def service(self, name: str, version: str = "") -> ModelService:
        """The model called ``name`` (and ``version``, when given), or ``NotFound``."""
        ...

    def server_metadata(self) -> dict[str, Any]: ...

    def repository_index(self) -> list[dict[str, str]]: ...

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]: ...


def check_restricted(headers: Mapping[str, str], restricted: tuple[str, str] | None) -> None:
    """The restricted header (name, value), if one is configured; ``headers`` are case-insensitive HTTP headers or
    lower-case gRPC metadata. Compared in constant time; the value never appears in a message."""
    if restricted is None:
        return
    name, expected = restricted
    got = headers.get(name, headers.get(name.lower()))
    if got is None:
        raise Unauthenticated(f"this endpoint needs the {name} header")
    if not hmac.compare_digest(got.encode(), expected.encode()):
        raise PermissionDenied(f"the {name} header does not match")


def find_service(services: Mapping[str, ModelService], name: str, version: str = "",
                 unavailable: Mapping[str, str] | None = None) -> ModelService:
    """The service called ``name`` (and ``version``, when given); a 400 with the reason for a model that failed
    to load (``unavailable``: name -> reason, as Triton answers for a model it could not load); else a 404 listing
    what is served."""
    service = services.get(name)
    if service is None and unavailable and name in unavailable:
        raise BadRequest(f"model {name!r} is unavailable: it failed to load ({unavailable[name]})")
    if service is None:
        raise NotFound(f"unknown model {name!r}; this server has {sorted(services)}")
    if version not in ("", service.version):
        raise NotFound(f"model {name!r} has no version {version!r}; it has version {service.version}")
    return service


def repository_index(services: Mapping[str, ModelService],
                     unavailable: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Triton's repository index: every model with its state (READY, LOADING, or UNAVAILABLE with the reason)."""
    entries = {name: {"name": name, "version": service.version, "state": "READY" if service.ready else "LOADING"}
               for name, service in services.items()}
    for name, reason in (unavailable or {}).items():
        entries[name] = {"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason}
    return [entries[name] for name in sorted(entries)]
