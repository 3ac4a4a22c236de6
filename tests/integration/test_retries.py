"""Retries that never charge twice: quorum, a node restarting mid-query, a lost reply.

Real node and hub processes on loopback. A node keeps the release of every envelope it
charged, so the hub may call it again while it is unreachable and the analyst may re-send the
same envelope: each node's budget moves once per envelope, whatever is retried.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols import serde
from protocols.cli import ExitCode, exit_code_of
from protocols.security.envelope import Operation, sign_query
from protocols.security.pki import load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import hub_pb2_grpc, node_pb2, node_pb2_grpc
from queries.errors import QueryError, QuorumNotMetError
from queries.results import NodeStatus
from queries.spec import Query, canonical_bytes

pytestmark = pytest.mark.integration

QUERY = Query(view="persons", rho=0.05, group_by=("sex",))


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[LocalFederation]:
    folders = synth.generate_federation(3_000, tmp_path / "data", seed=11)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], total_rho=10.0, max_rho_per_query=1.0)
        for r in synth.REGIONS
    )
    with LocalFederation(workdir=tmp_path, nodes=setups, deadline_ms=5_000) as federation:
        yield federation


def _spent(client: Federation, nodes: int = 4) -> dict[str, float]:
    """Every node's spend, waiting (up to 15 s) for a node that has just restarted."""
    give_up = time.monotonic() + 15
    while True:
        spent = {b.node: b.budget.rho_spent for b in client.budget() if b.budget is not None}
        if len(spent) == nodes or time.monotonic() > give_up:
            return spent
        time.sleep(0.2)


def _hub(fed: LocalFederation) -> hub_pb2_grpc.HubStub:
    analyst = load_identity(fed.analyst_identity)
    channel = secure_channel(fed.hub_address, analyst, server_name="hub")
    return hub_pb2_grpc.HubStub(channel)


def test_a_quorum_the_hub_cannot_meet_is_refused_before_any_node_is_asked(
    fed: LocalFederation,
) -> None:
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        before = _spent(client)
        with pytest.raises(QueryError, match="quorum: 5 nodes must answer, but this hub has 4"):
            client.query(QUERY, quorum=5)
        assert _spent(client) == before


def test_quorum_not_met_then_the_same_envelope_reads_the_kept_releases(
    fed: LocalFederation,
) -> None:
    fed.stop_process("gm")
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        request = client._signed_request(QUERY, Operation.EXECUTE, deadline_s=5.0)
        request.quorum = 4
        with pytest.raises(grpc.RpcError) as info:
            _hub(fed).Submit(request, timeout=30)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        message = info.value.details() or ""
        assert message.startswith(QuorumNotMetError.PREFIX)
        assert "only 3 of 4 nodes answered" in message
        assert "gm unreachable" in message
        assert "re-send the same signed envelope" in message
        fed.restart_node("gm")
        after_first = _spent(client)
        # The three that answered were charged once; gm nothing.
        assert after_first["gm"] == 0
        assert all(after_first[n] == pytest.approx(0.05, rel=1e-6) for n in ("nenc", "nwc", "yh"))
        # The very same envelope again, with every node up: a full result, three of it re-sent.
        response = _hub(fed).Submit(request, timeout=30)
        result = serde.result_from_proto(response)
        assert not result.partial
        resent = {o.node: o.resent for o in result.nodes}
        assert resent == {"nenc": True, "nwc": True, "yh": True, "gm": False}
        assert all(o.status is NodeStatus.OK for o in result.nodes)
        after = _spent(client)
        assert after["gm"] == pytest.approx(0.05, rel=1e-6)
        assert {n: after[n] for n in ("nenc", "nwc", "yh")} == {
            n: after_first[n] for n in ("nenc", "nwc", "yh")
        }


def test_the_python_client_reports_a_quorum_not_met(fed: LocalFederation) -> None:
    fed.stop_process("yh")
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        with pytest.raises(QuorumNotMetError, match="fewer than the quorum of 4") as info:
            client.query(QUERY, quorum=4, deadline_s=3.0)
        # Like an unreachable hub, `chc query` exits 4 (no answer) for it.
        assert exit_code_of(info.value) is ExitCode.NO_ANSWER
        # Without a quorum the same situation is a flagged partial result.
        result = client.query(QUERY, deadline_s=3.0)
        assert result.partial


def test_the_hub_retries_a_node_that_restarts_during_the_query(fed: LocalFederation) -> None:
    """A crashed node that comes back within the retry window answers the same query."""
    setup = next(n for n in fed.nodes if n.name == "nwc")
    port = fed.node_port("nwc")
    fed.stop_process("nwc", sig=signal.SIGKILL)
    restarter = threading.Timer(0.5, lambda: fed.start_node(setup, port=port))
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        restarter.start()
        try:
            result = client.query(QUERY, deadline_s=20.0)
        finally:
            restarter.join()
    status = {o.node: o.status for o in result.nodes}
    assert status == dict.fromkeys(("nenc", "nwc", "yh", "gm"), NodeStatus.OK), result.nodes
    assert not result.partial


def test_a_node_known_to_be_down_does_not_hold_up_the_next_query(fed: LocalFederation) -> None:
    fed.stop_process("gm")
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        first = time.monotonic()
        client.query(QUERY, deadline_s=4.0)  # gm is given time to come back: it does not
        first_s = time.monotonic() - first
        second = time.monotonic()
        result = client.query(QUERY, deadline_s=4.0)
        second_s = time.monotonic() - second
    assert result.partial
    gm = next(o for o in result.nodes if o.node == "gm")
    assert gm.status is NodeStatus.UNREACHABLE
    # The first query retried gm until near its deadline; the second for a moment only.
    assert first_s > 3.0
    assert second_s < 2.5


def test_one_envelope_sent_many_times_at_once_is_charged_once(fed: LocalFederation) -> None:
    """Retries racing the first call wait for it and get its release; one ledger entry."""
    analyst = load_identity(fed.analyst_identity)
    channel = secure_channel(f"127.0.0.1:{fed.node_port('yh')}", analyst, server_name="yh")
    stub = node_pb2_grpc.NodeStub(channel)
    signed = sign_query(analyst, canonical_bytes(QUERY))
    request = node_pb2.ExecuteRequest(envelope=serde.signed_query_to_proto(signed))
    before = stub.Describe(node_pb2.DescribeRequest(), timeout=10).budget.rho_spent
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda _: stub.Execute(request, timeout=30), range(8)))
    after = stub.Describe(node_pb2.DescribeRequest(), timeout=10).budget.rho_spent
    channel.close()
    assert sum(not r.resent for r in replies) == 1
    assert len({(r.table, r.query_id, r.ledger_sequence) for r in replies}) == 1
    assert after - before == pytest.approx(QUERY.rho, rel=1e-6)
