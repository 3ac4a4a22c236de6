"""The optional plaintext listeners beside a server's mTLS port, and the settings naming them.

The main port requires a client certificate for every call, health included: an
orchestrator's probe (Kubernetes' gRPC probe, grpc_health_probe) has none. So a node or hub
may also serve, each off unless set in node.toml / hub.toml or on the command line:

- health_listen: the gRPC health service alone, plaintext (no other service is on it);
- metrics_listen: HTTP GET /metrics, the Prometheus text format.

Both default to nothing; an address that is not loopback logs a warning, as --insecure does:
neither carries data, but metrics show call counts and budget totals, and neither is
authenticated (put a firewall or an authenticating proxy in front).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from protocols.observability.health import Health
from protocols.observability.logs import LogFormat, check_log_format
from queries.errors import ConfigError

log = logging.getLogger(__name__)

# The keys node.toml and hub.toml accept at their top level for these settings.
SERVING_KEYS = frozenset({"metrics_listen", "health_listen", "log_format", "drain_grace_s"})
DEFAULT_DRAIN_GRACE_S = 30.0

NOT_LOOPBACK_WARNING = (
    "WARNING: {key} {address} is not a loopback address: anyone who can reach it can read "
    "{what} without a certificate. Bind it to 127.0.0.1, or firewall it."
)


@dataclass(frozen=True)
class ServingSettings:
    """How a server process is watched and stopped (node.toml / hub.toml top-level keys)."""

    # host:port for HTTP /metrics (None: no metrics listener).
    metrics_listen: str | None = None
    # host:port for a plaintext gRPC health service (None: health on the mTLS port only).
    health_listen: str | None = None
    log_format: LogFormat = "text"
    # How long a drain (SIGTERM) lets calls in flight finish before cutting them short.
    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S


def parse_serving(data: dict[str, Any], source: str) -> ServingSettings:
    """The SERVING_KEYS of a config file's top-level table, each checked."""
    addresses: dict[str, str | None] = {}
    for key in ("metrics_listen", "health_listen"):
        value = data.get(key)
        addresses[key] = None if value is None else split_address(value, f"{source}: {key}")[2]
    grace = data.get("drain_grace_s", DEFAULT_DRAIN_GRACE_S)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 3600:
        raise ConfigError(
            f"{source}: drain_grace_s must be a number of seconds from 0 to 3600 (how long a "
            f"stopping server lets calls finish), not {str(grace)[:40]!r}"
        )
    return ServingSettings(
        metrics_listen=addresses["metrics_listen"],
        health_listen=addresses["health_listen"],
        log_format=check_log_format(data.get("log_format", "text"), f"{source}: log_format"),
        drain_grace_s=float(grace),
    )


def split_address(value: object, source: str) -> tuple[str, int, str]:
    """(host, port, "host:port") of a listen address; IPv6 hosts in brackets ([::1]:9100)."""
    text = value if isinstance(value, str) else ""
    host, sep, port_text = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not bare or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f'{source} must be host:port, e.g. "127.0.0.1:9464" (port 0: any free port), '
            f"not {str(value)[:80]!r}"
        )
    return bare, int(port_text), text


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_unless_loopback(key: str, host: str, address: str, what: str) -> None:
    if not is_loopback(host):
        log.warning(NOT_LOOPBACK_WARNING.format(key=key, address=address, what=what))


@dataclass
class Listeners:
    """The running side listeners of one process (each None when not configured)."""

    metrics: WSGIServer | None = None
    metrics_thread: threading.Thread | None = None
    health: grpc.Server | None = None
    metrics_port: int | None = None
    health_port: int | None = None

    def stop(self) -> None:
        """Close both (health last: a probe sees NOT_SERVING until the very end)."""
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()
            if self.metrics_thread is not None:
                self.metrics_thread.join(timeout=5)
            self.metrics = None
        if self.health is not None:
            self.health.stop(None).wait()
            self.health = None


def start_listeners(
    settings: ServingSettings, *, registry: CollectorRegistry, health: Health
) -> Listeners:
    """Start the listeners settings name; the caller stops them (Listeners.stop)."""
    side = Listeners()
    try:
        if settings.metrics_listen is not None:
            host, port, address = split_address(settings.metrics_listen, "metrics_listen")
            _warn_unless_loopback("metrics_listen", host, address, "the metrics")
            try:
                side.metrics, side.metrics_thread = start_http_server(
                    port, addr=host, registry=registry
                )
            except OSError as exc:
                raise ConfigError(
                    f"metrics_listen {address}: cannot listen ({exc.strerror or exc}); is the "
                    "port in use?"
                ) from None
            side.metrics_port = int(side.metrics.server_port)
            log.info("metrics on http://%s:%d/metrics", host, side.metrics_port)
        if settings.health_listen is not None:
            host, port, address = split_address(settings.health_listen, "health_listen")
            _warn_unless_loopback("health_listen", host, address, "the health status")
            # Two threads: a probe's Check is quick; a Watch holds one while it lasts.
            pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="chc-health")
            server = grpc.server(pool)
            health.add_to(server)
            bound = server.add_insecure_port(address)
            if bound == 0:
                raise ConfigError(f"health_listen {address}: cannot listen; is the port in use?")
            server.start()
            side.health, side.health_port = server, bound
            log.info("plaintext health service on %s:%d", host, bound)
    except BaseException:
        side.stop()
        raise
    return side
