"""The hub's public Fleet endpoint: nginx in front of the loopback SuperLink, nodes only.

The SuperLink's Control API has no authentication in open-source Flower and shares its port
with the Fleet API, so the SuperLink binds 127.0.0.1 and this proxy is the network's way in:
mutual TLS against the federation CA, /v1/fleet/ forwarded for node certificates only, 403
for the rest (docs/training.md, "Closing the Control API").
"""

from __future__ import annotations

from pathlib import Path

from coordinator.learning.flower.superlink import SuperLink
from protocols.nginx_proxy import NginxProxy, render_hub_proxy
from protocols.security.pki import CA_FILE, CERT_FILE, KEY_FILE


def hub_fleet_proxy(link: SuperLink, identity: Path, listen: str, workdir: Path) -> NginxProxy:
    """A Fleet proxy on listen (host:port) for link, serving the hub identity's certificate.

    identity is the hub's identity folder (cert.pem, key.pem, ca.pem), whose certificate the
    nodes' forwarders check by the hub's name; the proxy trusts the same CA for both the nodes
    and the SuperLink. Call start() (or use it as a context manager) once link is started.
    """
    conf = render_hub_proxy(
        workdir=workdir,
        listen=listen,
        server_cert=identity / CERT_FILE,
        server_key=identity / KEY_FILE,
        ca=identity / CA_FILE,
        superlink_port=link.port,
    )
    return NginxProxy("hub-fleet-proxy", workdir, conf, int(listen.rsplit(":", 1)[1]))
