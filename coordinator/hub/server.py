"""Running the hub server."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

from coordinator.hub.registry import Registry, load_hub_config
from coordinator.hub.service import HubService
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
from protocols.v1 import hub_pb2, hub_pb2_grpc
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
    metrics = Metrics("hub")
    use_for_process(metrics)
    health = Health([hub_pb2.DESCRIPTOR.services_by_name["Hub"].full_name])
    server, port = make_server(
        listen or cfg.listen, None if insecure else identity, metrics=metrics, health=health
    )
    hub_pb2_grpc.add_HubServicer_to_server(service, server)
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
            server, grace=settings.drain_grace_s, health=health, metrics=metrics
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
