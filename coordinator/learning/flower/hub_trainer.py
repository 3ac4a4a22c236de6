"""The hub's trainer: its SuperLink, the nodes' SuperNode keys registered, one run at a time.

Started by the hub (coordinator/hub/server.py) when hub.toml has [learning]; the hub's
Train RPC hands it an analyst's signed fit envelope and gets the trained model back. The
SuperLink listens on loopback only: SuperNodes reach its Fleet API through the hub's Fleet
proxy (docs/training.md), and only this process submits runs to its Control API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from coordinator.hub.registry import LearningSettings, NodeEntry
from coordinator.learning.flower.fleet_proxy import hub_fleet_proxy
from coordinator.learning.flower.session import train_over_flower
from coordinator.learning.flower.superlink import SuperLink, SuperLinkTls
from coordinator.learning.trained import TrainedModel
from protocols.nginx_proxy import NginxProxy
from protocols.security.pki import CA_FILE, CERT_FILE, KEY_FILE
from protocols.v1 import node_pb2
from queries.errors import ConfigError

log = logging.getLogger("chc.hub.flower")


class HubTrainer:
    """A running SuperLink with the federation's SuperNodes registered."""

    def __init__(
        self, settings: LearningSettings, nodes: Sequence[NodeEntry], *, identity: Path
    ) -> None:
        self.settings = settings
        self.identity = identity  # the hub's identity folder, for the Fleet proxy
        self.nodes = [n for n in nodes if n.supernode_key is not None]
        if not self.nodes:
            raise ConfigError(
                "[learning] is set but no [[nodes]] entry has a supernode_key: no SuperNode "
                "could join; give each training node's public key (its supernode_key.pub)"
            )
        folder = settings.superlink_tls
        tls = SuperLinkTls(ca=folder / CA_FILE, cert=folder / CERT_FILE, key=folder / KEY_FILE)
        self.link = SuperLink(settings.workdir, tls, port=settings.superlink_port)
        self.proxy: NginxProxy | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the SuperLink and register every node's SuperNode key."""
        self.link.start()
        try:
            for node in self.nodes:
                key = node.supernode_key
                if key is None or not key.is_file():
                    raise ConfigError(
                        f"node {node.name}: supernode_key {key} does not exist; copy the "
                        "node's supernode_key.pub (from its identity folder) there"
                    )
                self.link.register(node.name, key)
            if self.settings.fleet_listen is not None:
                self.proxy = hub_fleet_proxy(
                    self.link,
                    self.identity,
                    self.settings.fleet_listen,
                    Path(self.settings.workdir) / "fleet_proxy",
                )
                self.proxy.start()
        except Exception:
            self.stop()
            raise
        log.info(
            "SuperLink on %s with %d SuperNode key(s) registered; Fleet proxy: %s",
            self.link.address,
            len(self.nodes),
            self.settings.fleet_listen or "none (SuperNodes on this machine only)",
        )

    def stop(self) -> None:
        """Stop the Fleet proxy, then the SuperLink (and any run's ServerApp)."""
        if self.proxy is not None:
            self.proxy.stop()
        self.link.stop()

    def train(self, envelope: node_pb2.QueryEnvelope) -> TrainedModel:
        """Run one training at every registered node (one run at a time on this hub)."""
        with self._lock:
            return train_over_flower(
                self.link,
                envelope,
                workdir=Path(self.settings.workdir) / "runs",
                min_nodes=len(self.nodes),
                step_deadline_s=self.settings.step_deadline_s,
                timeout_s=self.settings.run_timeout_s,
            )
