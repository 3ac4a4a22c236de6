"""Many chc nodes in one process, for the fan-out benchmark (bench/fanout.py).

A hundred `chc-node serve` processes would not fit a 2-core machine, so this runs each node
the way `chc-node serve` does (node/cli.py) but side by side in one process: for every
node.toml given, its own identity, OmopStore, ledger (SQLite in the file's `ledger`, or in
memory) and NodeService behind its own gRPC server with mutual TLS on its own loopback port.
What the pool leaves out of `serve` is per process only: logging set-up, the drain on
SIGTERM, and (in trees that have them) the node's metrics and health listeners.

Once every node listens, it writes a ready file (JSON: pid, startup seconds and each node's
port), then serves until SIGTERM or SIGINT and stops every server at once.

Run: python -m bench._node_pool --configs FILE --ready-file PATH [--memory-ledger]
(FILE lists one node.toml path a line.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from node.budget.accounting import Accountant, open_accountant
from node.config import load_config
from node.data.store import OmopStore
from node.service import NodeService
from protocols.revocation import CRL_FILE, RevocationList
from protocols.rpc import make_server
from protocols.security.pki import Role, load_identity
from protocols.v1 import node_pb2_grpc
from queries.errors import ConfigError

log = logging.getLogger("chc.bench.node_pool")

# Worker threads per node's gRPC server: the hub sends one call per node per query, and one
# analyst's queries do not overlap, so a few suffice (ThreadPoolExecutor starts them lazily).
WORKERS_PER_NODE = 4


@dataclass
class PooledNode:
    """One running node of the pool and what it must close."""

    name: str
    port: int
    server: grpc.Server
    store: OmopStore
    accountant: Accountant


def start_node(config: Path, *, memory_ledger: bool, threads: int) -> PooledNode:
    """Start one node from its node.toml as `chc-node serve` builds it; return it listening."""
    cfg = load_config(config)
    identity = load_identity(cfg.identity)
    if identity.role is not Role.NODE:
        raise ConfigError(
            f"{config}: {cfg.identity} holds a {identity.role.value} certificate, not a node "
            "one; issue one with `chc pki issue --role node`"
        )
    accountant = open_accountant(cfg, config_file=config, memory=memory_ledger)
    store = OmopStore.from_config(cfg, threads=threads)
    service = NodeService(
        name=cfg.name,
        store=store,
        catalog=store.catalog(),
        accountant=accountant,
        ca_pem=identity.ca_pem,
        rules=cfg.release,
        access=cfg.access,
        revocations=RevocationList(cfg.crl or cfg.identity / CRL_FILE, identity.ca_pem),
        models=cfg.models,
        identity=identity,
    )
    server, port = make_server(cfg.listen, identity, max_workers=WORKERS_PER_NODE)
    node_pb2_grpc.add_NodeServicer_to_server(service, server)
    server.start()
    return PooledNode(name=cfg.name, port=port, server=server, store=store, accountant=accountant)


def stop_all(nodes: list[PooledNode]) -> None:
    """Stop every server at once, then close the stores and ledgers."""
    for node in nodes:
        node.server.stop(0)
    for node in nodes:
        node.store.close()
        node.accountant.close()


def write_ready(path: Path, nodes: list[PooledNode], startup_s: float) -> None:
    """The ready file, written atomically so that the benchmark never reads half of it."""
    data = {
        "pid": os.getpid(),
        "startup_seconds": round(startup_s, 3),
        "ports": {n.name: n.port for n in nodes},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)


def _on_signal(stop: threading.Event) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        del signum, frame
        stop.set()

    return handler


def main() -> None:
    """Start every node listed, announce their ports, serve until signalled."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", type=Path, required=True, help="node.toml paths, one a line")
    ap.add_argument("--ready-file", type=Path, required=True)
    ap.add_argument("--memory-ledger", action="store_true", help="in-memory ledgers")
    ap.add_argument("--threads", type=int, default=1, help="DuckDB threads per node")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    # Installed first: a SIGTERM during start-up still closes what has been started.
    signal.signal(signal.SIGTERM, _on_signal(stop))
    signal.signal(signal.SIGINT, _on_signal(stop))
    configs = [
        Path(line.strip())
        for line in args.configs.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    began = time.perf_counter()
    nodes: list[PooledNode] = []
    try:
        for config in configs:
            if stop.is_set():
                return
            nodes.append(start_node(config, memory_ledger=args.memory_ledger, threads=args.threads))
        write_ready(args.ready_file, nodes, time.perf_counter() - began)
        stop.wait()
    finally:
        stop_all(nodes)


if __name__ == "__main__":
    main()
