"""A node killed (SIGKILL) or frozen (SIGSTOP) while queries are in flight through the hub.

Four real nodes and a hub on loopback; worker threads keep queries in flight while the fault
is injected. Whatever the node was doing when the signal came, the analyst must get a partial
result naming the node within the deadline, no release may lack its ledger entry, no envelope
may be charged twice, every ledger must verify, and `chc budget` must show every charge,
including those whose answers never reached the analyst.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import ANALYST_NAME, HUB_NAME, LocalFederation, NodeSetup
from protocols import serde
from protocols.security.pki import load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import hub_pb2, hub_pb2_grpc
from queries.results import NodeStatus
from queries.spec import Query
from tests.faults._invariants import (
    DEADLINE_MARGIN_S,
    check_all,
    check_budget_matches_ledgers,
    ledger_bodies,
    nonce_of,
    receipts,
    released,
)
from tests.faults._traffic import Sent, Traffic

pytestmark = [pytest.mark.faults, pytest.mark.integration]

VICTIM = "nwc"
DEADLINE_S = 2.0
QUERY = Query(view="persons", rho=0.001, group_by=("sex",))


def _federation(root: Path) -> LocalFederation:
    folders = synth.generate_federation(4_000, root / "data", seed=11)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], total_rho=1e3, max_rho_per_query=1.0)
        for r in synth.REGIONS
    )
    return LocalFederation(workdir=root, nodes=setups, deadline_ms=int(DEADLINE_S * 1000))


def _victim(sent: Sent) -> NodeStatus | None:
    """The victim's status in one result (None for an error)."""
    if sent.result is None:
        return None
    return next(o.status for o in sent.result.nodes if o.node == VICTIM)


def _check_in_time(sent: list[Sent]) -> None:
    for s in sent:
        assert s.elapsed_s <= DEADLINE_S + DEADLINE_MARGIN_S, s
        # A node fault is never the whole federation's: the other three answer.
        assert s.result is not None, f"the analyst got an error, not a partial result: {s}"


def test_sigkill_mid_query_gives_partial_result_and_loses_no_charge(tmp_path: Path) -> None:
    with (
        _federation(tmp_path) as fed,
        Traffic(fed.hub_address, fed.analyst_identity, QUERY, DEADLINE_S) as traffic,
    ):
        traffic.wait_for("20 results", lambda s: len(s) >= 20, 60)
        # Queries are in flight at every node: the kill lands mid-query. The node stays down
        # for two deadlines, longer than the hub's retries can wait for it.
        fed.restart_node(VICTIM, sig=signal.SIGKILL, down_s=2 * DEADLINE_S)
        restarted = len(traffic.snapshot())
        traffic.wait_for(
            "10 complete results after the restart",
            lambda s: sum(_victim(x) is NodeStatus.OK for x in s[restarted:]) >= 10,
            60,
        )
        traffic.stop()
        sent = traffic.snapshot()
        _check_in_time(sent)
        missing = [s.result for s in sent if _victim(s) not in (NodeStatus.OK, None)]
        assert missing, "no query saw the node down: the kill did not land during traffic"
        for result in missing:
            assert result is not None
            assert result.partial
            outcome = next(o for o in result.nodes if o.node == VICTIM)
            assert outcome.status in (NodeStatus.UNREACHABLE, NodeStatus.TIMED_OUT), outcome
            assert VICTIM in outcome.message, outcome.message
            # The three others still answered and were combined.
            assert sum(o.status is NodeStatus.OK for o in result.nodes) == 3
        check_all(fed, traffic.receipts(ANALYST_NAME))
        check_budget_matches_ledgers(fed, fed.analyst_identity, ANALYST_NAME)


def test_sigstop_node_times_out_and_charges_nothing_unseen(tmp_path: Path) -> None:
    """A frozen node is reported timed_out in time; once thawed, it charges nothing unseen.

    After SIGCONT the node may still work through what it had received: each such envelope
    must then be either refused at no cost (it sees the deadline has passed) or charged in
    an entry that `chc budget` shows. Nothing may be charged twice.
    """
    with _federation(tmp_path) as fed:
        with Traffic(fed.hub_address, fed.analyst_identity, QUERY, DEADLINE_S) as traffic:
            traffic.wait_for("20 results", lambda s: len(s) >= 20, 60)
            os.kill(fed.pid(VICTIM), signal.SIGSTOP)  # queries are in flight there
            try:
                frozen = len(traffic.snapshot())
                traffic.wait_for(
                    "4 results with the node timed out",
                    lambda s: sum(_victim(x) is NodeStatus.TIMED_OUT for x in s[frozen:]) >= 4,
                    30,
                )
                # One more, sent while the node is certainly frozen, to find in its ledger.
                with Federation(fed.hub_address, fed.analyst_identity) as client:
                    envelope = client.sign(QUERY)
                channel = secure_channel(
                    fed.hub_address, load_identity(fed.analyst_identity), server_name=HUB_NAME
                )
                with channel:
                    started = time.monotonic()
                    reply = hub_pb2_grpc.HubStub(channel).Submit(
                        hub_pb2.SubmitRequest(
                            envelope=envelope, deadline_ms=int(DEADLINE_S * 1000)
                        ),
                        timeout=DEADLINE_S + 5,
                    )
                    elapsed = time.monotonic() - started
            finally:
                os.kill(fed.pid(VICTIM), signal.SIGCONT)
            thawed = len(traffic.snapshot())
            traffic.wait_for(
                "5 complete results after SIGCONT",
                lambda s: sum(_victim(x) is NodeStatus.OK for x in s[thawed:]) >= 5,
                60,
            )
        sent = traffic.snapshot()
        _check_in_time(sent)
        late = serde.result_from_proto(reply)
        assert elapsed <= DEADLINE_S + DEADLINE_MARGIN_S
        assert late.partial
        outcome = next(o for o in late.nodes if o.node == VICTIM)
        assert outcome.status is NodeStatus.TIMED_OUT, outcome
        assert f"within {DEADLINE_S:g} s" in outcome.message, outcome.message
        assert "chc budget" in outcome.message  # it tells the analyst where a charge shows
        # Give the thawed node time to finish anything it still held, then look at its ledger.
        time.sleep(1.0)
        bodies = ledger_bodies(fed.ledger_path(VICTIM))
        # Either nothing (the call was dropped), a zero-cost refusal, or one visible charge.
        charged = [b for b in released(bodies) if nonce_of(b) == envelope.nonce]
        assert len(charged) <= 1, charged
        got = [r for s in sent if s.result for r in receipts(s.result, ANALYST_NAME)]
        got += receipts(late, ANALYST_NAME)
        check_all(fed, got)
        # Every charge, seen by the analyst or not, is what `chc budget` reports as spent.
        check_budget_matches_ledgers(fed, fed.analyst_identity, ANALYST_NAME)
