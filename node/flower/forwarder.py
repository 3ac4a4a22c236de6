"""A node's Fleet forwarder: nginx on loopback, carrying its SuperNode to the hub's Fleet proxy.

Flower's SuperNode cannot present a client certificate, and the hub's Fleet proxy serves only
node certificates, so with `[learning] hub_fleet` the SuperNode dials this forwarder instead
and the forwarder speaks mutual TLS with the node's own identity (docs/training.md, "Closing
the Control API").
"""

from __future__ import annotations

from pathlib import Path

from node.config import NodeConfig
from protocols.flower_process import free_port
from protocols.nginx_proxy import NginxProxy, render_node_forward
from protocols.security.pki import CA_FILE, CERT_FILE, KEY_FILE
from queries.errors import ConfigError


def fleet_forwarder_for(config: NodeConfig, config_file: Path) -> NginxProxy:
    """The forwarder of a node served from config_file, to its [learning] hub_fleet.

    It serves the node's identity certificate on 127.0.0.1 (every chc node certificate names
    127.0.0.1) and its working files and logs go in <name>.flower/fleet_forward/.
    """
    hub_fleet = config.learning.hub_fleet
    if hub_fleet is None:
        raise ConfigError("[learning] hub_fleet is not set: there is no hub Fleet proxy to dial")
    port = free_port()
    workdir = config_file.parent / f"{config.name}.flower" / "fleet_forward"
    cert, key = config.identity / CERT_FILE, config.identity / KEY_FILE
    conf = render_node_forward(
        workdir=workdir,
        local_port=port,
        server_cert=cert,
        server_key=key,
        node_cert=cert,
        node_key=key,
        ca=config.learning.root_certificate or config.identity / CA_FILE,
        hub_address=hub_fleet,
        hub_name=config.learning.hub_name or hub_fleet.rsplit(":", 1)[0].strip("[]"),
    )
    return NginxProxy("node-fleet-forward", workdir, conf, port)


def forwarder_address(proxy: NginxProxy) -> str:
    """The host:port the node's SuperNode dials to reach the forwarder."""
    return f"127.0.0.1:{proxy.port}"
