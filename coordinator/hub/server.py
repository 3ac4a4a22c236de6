"""Running the hub server."""

from __future__ import annotations

import logging
from pathlib import Path

from coordinator.hub.registry import Registry, load_hub_config
from coordinator.hub.service import HubService
from protocols.process import serve_until_signalled, write_ready_file
from protocols.revocation import CRL_FILE, RevocationList
from protocols.rpc import make_server
from protocols.security.pki import Role, load_identity
from protocols.v1 import hub_pb2_grpc
from queries.errors import ConfigError

log = logging.getLogger("chc.hub")


def serve_hub(
    config: Path,
    *,
    ready_file: Path | None = None,
    listen: str | None = None,
    insecure: bool = False,
) -> None:
    """Start the hub from hub.toml and serve until SIGINT/SIGTERM."""
    cfg = load_hub_config(config)
    identity = load_identity(cfg.identity)
    if identity.role is not Role.HUB:
        raise ConfigError(
            f"{cfg.identity} holds a {identity.role.value} certificate, not a hub one"
        )
    registry = Registry(cfg.nodes, None if insecure else identity)
    trainer = None
    if cfg.learning is not None:
        # Imported here: a hub without [learning] never loads the Flower plumbing.
        from coordinator.learning.flower.hub_trainer import HubTrainer

        trainer = HubTrainer(cfg.learning, cfg.nodes, identity=cfg.identity)
        trainer.start()
    service = HubService(
        registry,
        deadline_ms=cfg.deadline_ms,
        require_tls=not insecure,
        rules=cfg.release,
        revocations=RevocationList(cfg.crl or cfg.identity / CRL_FILE, identity.ca_pem),
        trainer=trainer.train if trainer is not None else None,
    )
    server, port = make_server(listen or cfg.listen, None if insecure else identity)
    hub_pb2_grpc.add_HubServicer_to_server(service, server)
    server.start()
    log.info("hub serving %d node(s) on port %d", len(cfg.nodes), port)
    if ready_file is not None:
        write_ready_file(ready_file, port=port, name="hub")
    try:
        serve_until_signalled(server)
    finally:
        if trainer is not None:
            trainer.stop()
    registry.close()
    log.info("hub stopped")
