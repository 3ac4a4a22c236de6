"""Running the hub server."""

from __future__ import annotations

import logging
import threading
import tomllib
from pathlib import Path
from typing import Any

import grpc

from coordinator.hub.links import (
    LedgerRelayService,
    Links,
    NodeLinkService,
)
from coordinator.hub.registry import Registry, load_hub_config
from coordinator.hub.service import HubService
from protocols.link_frames import DIAL_ADDRESS
from protocols.observability.health import Health
from protocols.observability.listeners import (
    SERVING_KEYS,
    ServingSettings,
    parse_serving,
    start_listeners,
)
from protocols.observability.metrics import Metrics, use_for_process
from protocols.process import exit_now, serve_until_signalled, write_ready_file
from protocols.revocation import CRL_FILE, RevocationList
from protocols.rpc import make_server
from protocols.security.pki import Role, load_identity
from protocols.v1 import hub_pb2, hub_pb2_grpc, link_pb2_grpc
from queries.errors import ConfigError

log = logging.getLogger("chc.hub")


def hub_serving_settings(config: Path, overrides: dict[str, Any] | None = None) -> ServingSettings:
    """hub.toml's health, metrics, log and drain settings, with command-line overrides.

    hub.toml is read (and its other keys checked) by load_hub_config; this reads only the
    SERVING_KEYS of its top level. An override of None leaves the file's setting.
    """
    try:
        data: dict[str, Any] = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        data = {}  # load_hub_config says what is wrong with the file
    chosen = {key: data[key] for key in SERVING_KEYS if key in data}
    chosen.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_serving(chosen, str(config))


def serve_hub(
    config: Path,
    *,
    ready_file: Path | None = None,
    listen: str | None = None,
    insecure: bool = False,
    serving: ServingSettings | None = None,
) -> None:
    """Start the hub from hub.toml and serve until SIGINT/SIGTERM, then drain.

    The drain: health NOT_SERVING, no new calls, fan-outs in flight get serving's
    drain_grace_s to finish (docs/observability.md); a second signal stops at once.
    """
    cfg = load_hub_config(config)
    settings = serving if serving is not None else hub_serving_settings(config)
    identity = load_identity(cfg.identity)
    if identity.role is not Role.HUB:
        raise ConfigError(
            f"{cfg.identity} holds a {identity.role.value} certificate, not a hub one"
        )
    dialing = frozenset(n.name for n in cfg.nodes if n.address == DIAL_ADDRESS)
    if insecure and dialing:
        raise ConfigError(
            f"{config}: outbound-only nodes ({', '.join(sorted(dialing))}) link over mutual TLS "
            "only; run the hub without --insecure"
        )
    links = Links(dialing)
    registry = Registry(cfg.nodes, None if insecure else identity, links=links)
    trainer = None
    if cfg.learning is not None:
        # Imported here: a hub without [learning] never loads the Flower plumbing.
        from coordinator.learning.flower.hub_trainer import HubTrainer

        trainer = HubTrainer(cfg.learning, cfg.nodes, identity=cfg.identity)
        trainer.start()
    revocations = RevocationList(cfg.crl or cfg.identity / CRL_FILE, identity.ca_pem)
    service = HubService(
        registry,
        deadline_ms=cfg.deadline_ms,
        require_tls=not insecure,
        rules=cfg.release,
        revocations=revocations,
        trainer=trainer.train if trainer is not None else None,
    )
    metrics = Metrics("hub")
    use_for_process(metrics)
    health = Health([hub_pb2.DESCRIPTOR.services_by_name["Hub"].full_name])
    server, port = make_server(
        listen or cfg.listen,
        None if insecure else identity,
        metrics=metrics,
        health=health,
        # Each outbound-only node's link holds one worker thread for as long as it is open.
        max_workers=16 + len(dialing),
    )
    hub_pb2_grpc.add_HubServicer_to_server(service, server)
    if dialing:
        is_revoked = revocations.is_revoked
        link_pb2_grpc.add_NodeLinkServicer_to_server(
            NodeLinkService(links, identity, is_revoked=is_revoked), server
        )
        link_pb2_grpc.add_LedgerRelayServicer_to_server(
            LedgerRelayService(links, is_revoked=is_revoked), server
        )
    side = start_listeners(settings, registry=metrics.registry, health=health)
    try:
        server.start()
        health.serving()
        log.info("hub serving %d node(s) on port %d", len(cfg.nodes), port)
        if ready_file is not None:
            write_ready_file(
                ready_file,
                port=port,
                name="hub",
                metrics_port=side.metrics_port,
                health_port=side.health_port,
            )
        drained = serve_until_signalled(
            _ClosingLinks(server, links) if dialing else server,
            grace=settings.drain_grace_s,
            health=health,
            metrics=metrics,
        )
    finally:
        if trainer is not None:
            trainer.stop()
        server.stop(0)  # at once only if serving failed: a drain has already stopped it
        side.stop()
    if not drained.clean:
        log.warning("hub stopped with %d call(s) cut short", drained.busy)
        exit_now(1)
    registry.close()
    log.info("hub stopped")


class _ClosingLinks(grpc.Server):
    """The hub's server, whose drain also closes the outbound-only nodes' links.

    A link is a call that never ends by itself, so a drain would otherwise wait its whole
    grace period for it. Closing the links first (after health has turned NOT_SERVING) ends
    them at once; the nodes dial again, and reach the hub once it is back.
    """

    def __init__(self, server: grpc.Server, links: Links) -> None:
        self._server = server
        self._links = links

    def stop(self, grace: float | None = None) -> threading.Event:
        """Close every link, then stop the server as asked."""
        self._links.close_all("the hub is shutting down")
        return self._server.stop(grace)

    def start(self) -> None:
        """Start the server."""
        self._server.start()

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        """Add handlers to the server."""
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_insecure_port(self, address: str) -> int:
        """Listen on address (plaintext)."""
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """Listen on address (TLS)."""
        return self._server.add_secure_port(address, server_credentials)
