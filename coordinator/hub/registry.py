"""The hub's view of the federation: which nodes exist and how to reach them (hub.toml)."""

from __future__ import annotations

import functools
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from protocols.link_frames import DIAL_ADDRESS
from protocols.observability.listeners import SERVING_KEYS
from protocols.retries import NODE_CHANNEL_OPTIONS
from protocols.security.pki import Identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2_grpc
from queries.errors import ConfigError
from queries.results import ReleaseRules
from queries.schema import Catalog

if TYPE_CHECKING:
    from coordinator.hub.links import Links

# How long a node's described catalog is trusted before the hub asks again (for the pooling
# check before a query; a node that changed its catalog meanwhile refuses the query itself).
CATALOG_TTL_S = 60.0
# How long a node that did not answer its Describe is left undescribed (it then checks the
# query's structure itself), so that a node that is down does not slow every query.
DESCRIBE_FAILED_TTL_S = 15.0

# The keys load_hub_config accepts: top level, in each [[nodes]] and in [release]; every one
# is documented in docs/configuration.md (tests/unit/test_configuration_doc.py checks).
HUB_KEYS = (
    frozenset({"identity", "nodes", "listen", "deadline_ms", "release", "crl", "learning"})
    | SERVING_KEYS
)
HUB_NODE_KEYS = frozenset({"name", "address", "title", "supernode_key"})
HUB_LEARNING_KEYS = frozenset(
    {
        "superlink_port",
        "superlink_tls",
        "workdir",
        "step_deadline_s",
        "run_timeout_s",
        "fleet_listen",
    }
)
HUB_RELEASE_KEYS = frozenset({"suppress_below", "round_to"})


@dataclass(frozen=True)
class NodeEntry:
    """One node as configured at the hub."""

    name: str
    address: str
    title: str = ""
    # The node's SuperNode public key (OpenSSH), registered with the hub's SuperLink.
    supernode_key: Path | None = None


@dataclass(frozen=True)
class LearningSettings:
    """[learning]: the hub's Flower SuperLink (on loopback) for training over rounds."""

    superlink_port: int
    # A folder with the SuperLink's server certificate (cert.pem, key.pem, ca.pem).
    superlink_tls: Path
    workdir: Path
    step_deadline_s: float = 60.0
    run_timeout_s: float = 1800.0
    # host:port of the hub's public Fleet proxy (nginx, mutual TLS, nodes only); None: no
    # proxy, so only SuperNodes on this machine can reach the loopback SuperLink.
    fleet_listen: str | None = None


@dataclass(frozen=True)
class HubConfig:
    """Everything the hub needs to start."""

    identity: Path
    nodes: tuple[NodeEntry, ...]
    listen: str = "127.0.0.1:50050"
    deadline_ms: int = 30_000
    # Disclosure rules for everything the hub shows (nodes may only make them stricter).
    release: ReleaseRules = field(default_factory=ReleaseRules)
    crl: Path | None = None
    learning: LearningSettings | None = None


def load_hub_config(path: Path) -> HubConfig:
    """Read hub.toml; relative paths are taken from the file's folder."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"hub config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - HUB_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(HUB_KEYS)}")
    if "identity" not in data:
        raise ConfigError(f"{path}: missing 'identity' (the hub's certificate folder)")
    raw_nodes = data.get("nodes", [])
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError(f"{path}: list at least one [[nodes]] with name and address")
    nodes = []
    for i, n in enumerate(raw_nodes):
        if not isinstance(n, dict) or "name" not in n or "address" not in n:
            raise ConfigError(f"{path}: nodes[{i}] needs 'name' and 'address'")
        # A misspelt key (say `adress` beside `address`, or `tilte`) must not pass silently.
        unknown_node = sorted(set(n) - HUB_NODE_KEYS)
        if unknown_node:
            raise ConfigError(
                f"{path}: nodes[{i}] has unknown key(s) {unknown_node}; "
                f"known: {sorted(HUB_NODE_KEYS)}"
            )
        key = n.get("supernode_key")
        nodes.append(
            NodeEntry(
                name=str(n["name"]),
                address=str(n["address"]),
                title=str(n.get("title", n["name"])),
                supernode_key=_path(path, key) if key is not None else None,
            )
        )
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: node names repeat: {names}")
    deadline = data.get("deadline_ms", 30_000)
    if not isinstance(deadline, int) or deadline <= 0:
        raise ConfigError(f"{path}: deadline_ms must be a positive integer")
    identity = Path(str(data["identity"]))
    return HubConfig(
        identity=identity if identity.is_absolute() else path.parent / identity,
        nodes=tuple(nodes),
        listen=str(data.get("listen", "127.0.0.1:50050")),
        deadline_ms=deadline,
        release=_release(data.get("release", {}), path),
        crl=(path.parent / str(data["crl"])) if "crl" in data else None,
        learning=_learning(data["learning"], path) if "learning" in data else None,
    )


def _path(config: Path, raw: object) -> Path:
    p = Path(str(raw))
    return p if p.is_absolute() else config.parent / p


def _learning(raw: object, path: Path) -> LearningSettings:
    """[learning] of hub.toml, each key checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [learning] must be a table")
    unknown = sorted(set(raw) - HUB_LEARNING_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: [learning] has unknown key(s) {unknown}; known: {sorted(HUB_LEARNING_KEYS)}"
        )
    port = raw.get("superlink_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{path}: [learning] superlink_port must be a port number (1-65535)")
    if "superlink_tls" not in raw:
        raise ConfigError(
            f"{path}: [learning] needs superlink_tls, the folder of the SuperLink's server "
            "certificate (cert.pem, key.pem, ca.pem)"
        )
    seconds = {}
    for key, default in (("step_deadline_s", 60.0), ("run_timeout_s", 1800.0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{path}: [learning] {key} must be a positive number of seconds")
        seconds[key] = float(value)
    fleet = raw.get("fleet_listen")
    if fleet is not None and (not isinstance(fleet, str) or ":" not in fleet):
        raise ConfigError(f"{path}: [learning] fleet_listen must be host:port, e.g. 0.0.0.0:9443")
    return LearningSettings(
        fleet_listen=fleet,
        superlink_port=port,
        superlink_tls=_path(path, raw["superlink_tls"]),
        workdir=_path(path, raw.get("workdir", "superlink")),
        **seconds,
    )


def _release(raw: object, path: Path) -> ReleaseRules:
    if not isinstance(raw, dict) or set(raw) - HUB_RELEASE_KEYS:
        raise ConfigError(f"{path}: [release] takes suppress_below and round_to")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        raise ConfigError(f"{path}: release values must be whole numbers")
    return ReleaseRules(**raw)


class Reachability:
    """Whether a node's last call failed to reach it (the fan-out then does not retry it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down = False

    @property
    def down(self) -> bool:
        """True if the node's last call ended unreachable."""
        with self._lock:
            return self._down

    def record(self, *, reached: bool) -> None:
        """Note how the node's latest call ended."""
        with self._lock:
            self._down = not reached


class AsyncLink:
    """A node's asyncio channel and stub for the fan-out, opened on first use in its loop.

    grpc.aio channels belong to the event loop they are made in, so it is made there, by
    the fan-out (coordinator/hub/fanout.py), not when the registry is built.
    """

    def __init__(self, open_channel: Callable[[], grpc.aio.Channel]) -> None:
        self._open = open_channel
        self._channel: grpc.aio.Channel | None = None
        self._stub: node_pb2_grpc.NodeStub | None = None

    def stub(self) -> node_pb2_grpc.NodeStub:
        """The stub (call only in the fan-out's event loop)."""
        if self._stub is None:
            self._channel = self._open()
            self._stub = node_pb2_grpc.NodeStub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Close the channel if it was opened (in the fan-out's event loop)."""
        if self._channel is not None:
            await self._channel.close(None)


@dataclass(frozen=True)
class NodeHandle:
    """A connected node: its entry, channel and stub, and whether it was reachable lately.

    `stub` (blocking) serves one-off calls; fan-outs to every node use `link` (asyncio).
    """

    entry: NodeEntry
    channel: grpc.Channel
    stub: node_pb2_grpc.NodeStub
    link: AsyncLink
    reach: Reachability = field(default_factory=Reachability)


class Registry:
    """Open mutual-TLS channels to every configured node (or plaintext, in --insecure dev mode)."""

    def __init__(
        self, nodes: tuple[NodeEntry, ...], identity: Identity | None, *, links: Links | None = None
    ) -> None:
        self.handles: list[NodeHandle] = []
        for entry in nodes:
            if links is not None and entry.address == DIAL_ADDRESS:
                # An outbound-only node: reached over the link it opens (docs/outbound.md).
                self.handles.append(links.handle(entry))
                continue
            if identity is None:
                channel = grpc.insecure_channel(entry.address, options=NODE_CHANNEL_OPTIONS)
            else:
                # The node's certificate must carry its configured name: one node cannot
                # answer for another.
                channel = secure_channel(
                    entry.address, identity, server_name=entry.name, options=NODE_CHANNEL_OPTIONS
                )
            link = AsyncLink(functools.partial(_async_channel, entry, identity))
            self.handles.append(NodeHandle(entry, channel, node_pb2_grpc.NodeStub(channel), link))
        # Each node's catalog as it last described it, and when (time.monotonic()); None
        # for a node whose last Describe got no answer.
        self._catalogs: dict[str, tuple[float, Catalog | None]] = {}
        self._catalogs_lock = threading.Lock()

    def catalog(self, node: str) -> Catalog | None:
        """The node's catalog as described within CATALOG_TTL_S (None: none that recent)."""
        with self._catalogs_lock:
            found = self._catalogs.get(node)
        if found is None or time.monotonic() - found[0] > CATALOG_TTL_S:
            return None
        return found[1]

    def describe_failed(self, node: str) -> bool:
        """Whether the node's last Describe, within DESCRIBE_FAILED_TTL_S, got no answer."""
        with self._catalogs_lock:
            found = self._catalogs.get(node)
        return (
            found is not None
            and found[1] is None
            and time.monotonic() - found[0] <= DESCRIBE_FAILED_TTL_S
        )

    def remember(self, node: str, catalog: Catalog | None) -> None:
        """Keep a node's catalog from its Describe (None: it did not answer)."""
        with self._catalogs_lock:
            self._catalogs[node] = (time.monotonic(), catalog)

    def forget_catalogs(self) -> None:
        """Describe every node again before the next query (a node refused its structure)."""
        with self._catalogs_lock:
            self._catalogs.clear()

    def close(self) -> None:
        """Close every channel."""
        from coordinator.hub.fanout import close_links  # the fan-out owns the event loop

        close_links(self.handles)
        for h in self.handles:
            h.channel.close()


def _async_channel(entry: NodeEntry, identity: Identity | None) -> grpc.aio.Channel:
    """A node's asyncio channel, with the same mutual TLS and options as the blocking one."""
    if identity is None:
        return grpc.aio.insecure_channel(entry.address, options=NODE_CHANNEL_OPTIONS)
    return secure_channel(
        entry.address,
        identity,
        server_name=entry.name,
        options=NODE_CHANNEL_OPTIONS,
        asynchronous=True,
    )
