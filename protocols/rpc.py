"""gRPC plumbing shared by the node and the hub: servers, and errors mapped to status codes."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc

from protocols.observability.health import Health
from protocols.observability.metrics import Metrics
from protocols.security.pki import Identity
from protocols.security.tls import GRPC_OPTIONS, server_credentials
from protocols.version import caller_version, check_compatible
from queries.errors import ChcError

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")

INSECURE_WARNING = (
    "WARNING: --insecure: this server accepts unauthenticated plaintext connections. "
    "Use it only on a development machine, never with patient data."
)


# The trailing metadata key that carries what a refused call was charged (ChcError.rho_charged).
RHO_CHARGED_KEY = "chc-rho-charged"


def rho_charged_of(exc: grpc.RpcError) -> float:
    """What a refused call says it was charged (0 if it says nothing or nonsense).

    Blocking calls raise grpc.Call errors and asyncio ones AioRpcError; both carry
    trailing_metadata(), as (key, value) pairs.
    """
    read = getattr(exc, "trailing_metadata", None)
    trailer = read() if callable(read) else None
    items: list[tuple[str, str | bytes]] = list(trailer or ())
    for key, value in items:
        if key == RHO_CHARGED_KEY:
            try:
                charged = float(value)
            except (TypeError, ValueError):
                return 0.0
            return charged if 0.0 <= charged < float("inf") else 0.0
    return 0.0


def status_of(exc: ChcError) -> grpc.StatusCode:
    """The gRPC status an error maps to at a service boundary."""
    return grpc.StatusCode[exc.status_name]


def guarded(
    method: Callable[[Self, Req, grpc.ServicerContext], Resp],
) -> Callable[[Self, Req, grpc.ServicerContext], Resp]:
    """Turn ChcErrors into their gRPC status; hide anything else behind a reference id.

    Checks first that the caller speaks this protocol's major version (protocols/version.py).
    Clients never see a stack trace: an unexpected error is logged at the server with a
    reference the operator can grep for, and the client gets INTERNAL with that reference.
    """

    @functools.wraps(method)
    def wrapper(self: Self, request: Req, context: grpc.ServicerContext) -> Resp:
        try:
            # A caller of another major version is refused before anything is read or run.
            read = getattr(context, "invocation_metadata", None)
            check_compatible(
                caller_version(read() if callable(read) else None),
                them="the caller",
                us=getattr(self, "party", "this server"),
            )
            return method(self, request, context)
        except ChcError as exc:
            if exc.rho_charged:
                # Said in the trailer too, so the hub reports the charge with the refusal.
                context.set_trailing_metadata(((RHO_CHARGED_KEY, repr(exc.rho_charged)),))
            context.abort(status_of(exc), str(exc))
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error (ref %s) in %s", ref, method.__name__)
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error (ref {ref}); the operator can find it in the server log",
            )

    return wrapper


def make_server(
    listen: str,
    identity: Identity | None,
    *,
    max_workers: int = 16,
    metrics: Metrics | None = None,
    health: Health | None = None,
) -> tuple[grpc.Server, int]:
    """A gRPC server bound to listen with mutual TLS (or plaintext if identity is None).

    Returns the server and the bound port, so that listen may end in :0 for a free port.
    With metrics, every call on it is counted, timed and logged (the interceptor sees the
    final status code, refusals by context.abort included); with health, it serves the gRPC
    health service too (callers report SERVING once started: Health.serving).
    """
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = (
        [metrics.interceptor()] if metrics is not None else []
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=list(GRPC_OPTIONS),
        interceptors=interceptors,
    )
    if identity is None:
        log.warning(INSECURE_WARNING)
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, server_credentials(identity))
    if port == 0:
        raise ChcError(f"could not listen on {listen}; is the port in use?")
    if health is not None:
        health.add_to(server)
    return server, port
