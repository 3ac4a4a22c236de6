"""The hub killed (SIGKILL) during a fan-out and started again on the same port.

One node's link is slowed by a fault proxy, so that the fan-out is still waiting for it when
the hub dies, after the other three nodes have charged and answered. The analyst's call must
succeed within its deadline by re-sending the same signed envelope to the restarted hub: the
three nodes re-send what they kept, at no further cost, and the slow one answers. No envelope
is charged twice, the ledgers verify, and `chc budget` agrees with them.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import ANALYST_NAME, LocalFederation, NodeSetup
from queries.errors import ChcError
from queries.results import FederatedResult, NodeStatus
from queries.spec import Query
from tests.faults._invariants import (
    DEADLINE_MARGIN_S,
    Receipt,
    check_all,
    check_budget_matches_ledgers,
    ledger_bodies,
    receipts,
    released,
)
from tests.faults._proxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SLOW = "gm"
DEADLINE_S = 5.0
# The client gives the hub this much longer than the nodes' deadline (client.py).
CLIENT_ALLOWANCE_S = 5.0
QUERY = Query(view="persons", rho=0.001, group_by=("sex",))


def _released(fed: LocalFederation) -> dict[str, int]:
    return {s.name: len(released(ledger_bodies(fed.ledger_path(s.name)))) for s in fed.nodes}


def test_hub_killed_mid_fan_out_loses_and_doubles_no_charge(tmp_path: Path) -> None:
    folders = synth.generate_federation(4_000, tmp_path / "data", seed=17)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], total_rho=1e3, max_rho_per_query=1.0)
        for r in synth.REGIONS
    )
    got: list[Receipt] = []
    with FaultProxy() as proxy:
        fed = LocalFederation(
            workdir=tmp_path,
            nodes=setups,
            deadline_ms=int(DEADLINE_S * 1000),
            hub_addresses={SLOW: proxy.address},
        )
        with fed, Federation(fed.hub_address, fed.analyst_identity) as client:
            proxy.upstream = ("127.0.0.1", fed.node_port(SLOW))
            first = client.query(QUERY, deadline_s=DEADLINE_S)
            assert all(o.status is NodeStatus.OK for o in first.nodes)
            got += receipts(first, ANALYST_NAME)
            before = _released(fed)
            proxy.latency_s = 1.0  # the slow node's answer needs 2 s: the hub dies first

            outcome: list[FederatedResult | ChcError] = []
            timing: list[float] = []

            def ask() -> None:
                started = time.monotonic()
                try:
                    outcome.append(client.query(QUERY, deadline_s=DEADLINE_S))
                except ChcError as exc:
                    outcome.append(exc)
                timing.append(time.monotonic() - started)

            asking = threading.Thread(target=ask)
            asking.start()
            time.sleep(0.7)  # the three fast nodes have answered; the slow one has not
            fed.restart_hub(sig=signal.SIGKILL)
            proxy.latency_s = 0.0
            asking.join(timeout=DEADLINE_S + CLIENT_ALLOWANCE_S + 30)
            assert not asking.is_alive(), "the analyst's call never ended"
            assert timing[0] <= DEADLINE_S + CLIENT_ALLOWANCE_S + DEADLINE_MARGIN_S, timing

            (answer,) = outcome
            # Re-sent to the restarted hub: a whole result, the fast nodes' kept releases.
            assert isinstance(answer, FederatedResult), repr(answer)
            assert not answer.partial, answer.nodes
            resent = {o.node: o.resent for o in answer.nodes}
            assert resent == {s.name: s.name != SLOW for s in setups}, resent
            got += receipts(answer, ANALYST_NAME)
            after = _released(fed)
            # Every node charged the envelope exactly once, however often it was sent.
            assert all(after[s.name] - before[s.name] == 1 for s in setups), (before, after)

            # The restarted hub serves as before.
            again = client.query(QUERY, deadline_s=DEADLINE_S)
            assert all(o.status is NodeStatus.OK for o in again.nodes), again.nodes
            got += receipts(again, ANALYST_NAME)
            check_all(fed, got)
            # The charges whose answers died with the hub show in `chc budget`.
            check_budget_matches_ledgers(fed, fed.analyst_identity, ANALYST_NAME)
