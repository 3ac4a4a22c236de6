"""Reading a ledger through the hub's relay (outbound node, flow-controlled) against reading
it from the node itself, and the file straight from SQLite. Prints one JSON object.

A real federation on loopback (coordinator/local/federation.py): node nenc listens, node nwc
dials the hub (docs/outbound.md), both with mutual TLS. Each node's ledger is filled to
--entries released entries by real queries through the hub. Then, interleaved --repeats
times: nenc's ledger streamed from nenc (StreamLedger, as `chc audit verify` reads it), nwc's
streamed through the hub's relay (LedgerRelay.StreamNodeLedger, which the hub grants credit
for STREAM_WINDOW entries at a time, protocols/link_frames.py), and each file read straight
from SQLite on this machine (the raw baseline). Both ledgers hold the same kind and number of
entries, so entries per second compare.

Run: .venv/bin/python -m bench.ledger_relay [--entries 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.timing import summary
from coordinator.analyst.client import Federation
from coordinator.audit.sources import LedgerSource, open_file, open_relayed, open_remote
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, LocalFederation, NodeSetup
from protocols.link_frames import STREAM_WINDOW
from protocols.security.pki import Role, load_identity
from queries.spec import Query

INBOUND, OUTBOUND = "nenc", "nwc"


def _fill(fed: LocalFederation, entries: int) -> None:
    """Real releases at both nodes until each ledger holds `entries` of them."""
    query = Query(view="persons", rho=1e-4)
    fed_nodes = (INBOUND, OUTBOUND)
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        while True:
            held = [sum(1 for _ in open_file(fed.ledger_path(n)).read()) for n in fed_nodes]
            have = min(held)
            if have >= entries:
                return
            for _ in range(min(200, entries - have)):
                client.query(query, deadline_s=30)


def _read_all(source: Callable[[], LedgerSource]) -> tuple[float, int]:
    """Milliseconds to read a whole ledger (opening it included), and its entries."""
    began = time.perf_counter()
    n = sum(1 for _ in source().read())
    return (time.perf_counter() - began) * 1000, n


def main() -> None:
    """Fill both ledgers, time the three reads interleaved, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chc-bench-relay-") as tmp:
        root = Path(tmp)
        folders = synth.generate_federation(500, root / "data", seed=3)
        setups = tuple(
            NodeSetup(name=n, omop=folders[n], dial=n == OUTBOUND) for n in (INBOUND, OUTBOUND)
        )
        with LocalFederation(workdir=root, nodes=setups, deadline_ms=30_000) as fed:
            _fill(fed, args.entries)
            auditor = load_identity(fed.identity_dir(Role.AUDITOR, AUDITOR_NAME))
            address = f"127.0.0.1:{fed.node_port(INBOUND)}"
            ways: dict[str, Callable[[], LedgerSource]] = {
                "direct": lambda: open_remote(INBOUND, address, auditor),
                "relayed": lambda: open_relayed(OUTBOUND, fed.hub_address, auditor),
                "sqlite_file": lambda: open_file(fed.ledger_path(INBOUND)),
            }
            millis: dict[str, list[float]] = {k: [] for k in ways}
            counts: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, way in ways.items():
                    took, counts[name] = _read_all(way)
                    millis[name].append(took)
    p50 = {k: summary(v)["p50_ms"] / 1000 for k, v in millis.items()}
    print(
        json.dumps(
            {
                "entries": counts,
                "stream_window": STREAM_WINDOW,
                "read_ms": {k: summary(v) for k, v in millis.items()},
                "entries_per_s_p50": {k: round(counts[k] / p50[k]) for k in ways},
                "relayed_over_direct_p50": round(p50["relayed"] / p50["direct"], 2),
                "direct_over_sqlite_p50": round(p50["direct"] / p50["sqlite_file"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
