"""Outbound-only nodes (docs/outbound.md): two nodes dial the hub, two listen, one federation.

Real node and hub processes on loopback with mutual TLS: the outbound nodes open no port,
their answers pool with the inbound nodes', they link again after the hub is killed and
restarted, a stopped one is reported unreachable within the deadline, and an auditor
verifies an outbound node's ledger read through the hub's relay, which streams it under
flow control.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from coordinator.analyst.client import Federation
from coordinator.audit import verification
from coordinator.audit.cli import audit_app
from coordinator.audit.sources import open_relayed
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, LocalFederation, NodeSetup
from node.config import HubLinkConfig, load_config
from protocols.link_frames import MAX_LINK_STREAMS, STREAM_WINDOW
from protocols.security.pki import Role, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import link_pb2, link_pb2_grpc
from queries.errors import ConfigError
from queries.results import NodeOutcome, NodeStatus
from queries.spec import Query
from tests.faults._invariants import ledger_bodies

pytestmark = pytest.mark.integration

OUTBOUND = ("nwc", "gm")  # the regions that dial the hub; the other two listen
QUERY = Query(view="persons", rho=0.02, group_by=("sex",))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("outbound")
    folders = synth.generate_federation(4_000, root / "data", seed=11)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], title=r.name, dial=r.slug in OUTBOUND)
        for r in synth.REGIONS
    )
    with LocalFederation(workdir=root, nodes=setups, deadline_ms=5_000) as federation:
        yield federation


def _outcomes(fed: LocalFederation, deadline_s: float = 5.0) -> dict[str, NodeOutcome]:
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        result = client.query(QUERY, deadline_s=deadline_s)
    return {o.node: o for o in result.nodes}


def _statuses(fed: LocalFederation, deadline_s: float = 5.0) -> dict[str, NodeStatus]:
    return {node: o.status for node, o in _outcomes(fed, deadline_s).items()}


def _until_all_answer(fed: LocalFederation, within_s: float) -> float:
    """Seconds until a query is answered by every node (fails after within_s)."""
    began = time.monotonic()
    last: dict[str, NodeStatus] = {}
    while time.monotonic() - began < within_s:
        last = _statuses(fed, deadline_s=2.0)
        if all(s is NodeStatus.OK for s in last.values()):
            return time.monotonic() - began
        time.sleep(0.2)
    raise AssertionError(f"not every node answered within {within_s} s: {last}")


def test_hub_settings_are_checked(tmp_path: Path) -> None:
    """node.toml's [hub] is refused when it cannot work, saying what to set."""
    base = 'name = "nwc"\nomop = "o"\nidentity = "i"\n'
    cases = {
        "[hub]\ninbound = true\n": "but not dial",
        '[hub]\ndial = "hub.example.org"\n': "must be host:port",
        '[hub]\ndial = "hub:50050"\nhub_name = "a b"\n': "hub.hub_name must be the name",
        '[hub]\ndial = "hub:50050"\ndail = 1\n': "unknown [hub] key(s) ['dail']",
    }
    for text, message in cases.items():
        path = tmp_path / "node.toml"
        path.write_text(base + text)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert message in str(caught.value), text
    path.write_text(base + '[hub]\ndial = "hub.example.org:50050"\n')
    assert load_config(path).hub == HubLinkConfig(dial="hub.example.org:50050")


def test_outbound_nodes_open_no_port_and_pool_with_inbound_ones(fed: LocalFederation) -> None:
    for name in OUTBOUND:
        ready = json.loads((fed.workdir / "run" / f"{name}.ready").read_text())
        assert ready["port"] == 0  # no listening port at all
    _until_all_answer(fed, within_s=15)
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        result = client.query(QUERY)
    assert not result.partial
    assert {o.node for o in result.nodes} == {r.slug for r in synth.REGIONS}
    assert all(o.status is NodeStatus.OK and o.rho_charged > 0 for o in result.nodes)
    # Each outbound node charged its own ledger and said so with its receipt.
    assert all(o.ledger_sequence > 0 for o in result.nodes)
    assert result.table.num_rows > 0


def test_outbound_nodes_link_again_after_the_hub_is_killed(fed: LocalFederation) -> None:
    _until_all_answer(fed, within_s=15)
    fed.restart_hub(sig=signal.SIGKILL)
    took = _until_all_answer(fed, within_s=15)
    assert took < 10, f"the outbound nodes took {took:.1f} s to link again"


def test_a_stopped_outbound_node_is_unreachable_within_the_deadline(fed: LocalFederation) -> None:
    _until_all_answer(fed, within_s=15)
    stopped = OUTBOUND[0]
    os.kill(fed.pid(stopped), signal.SIGSTOP)
    try:
        # Until the hub notices the silence (protocols.link_frames.SILENT_AFTER_S) a call to
        # the stopped node times out; from then on it fails fast, unreachable.
        time.sleep(5.0)
        began = time.monotonic()
        statuses = _statuses(fed, deadline_s=3.0)
        took = time.monotonic() - began
    finally:
        os.kill(fed.pid(stopped), signal.SIGCONT)
    assert statuses[stopped] is NodeStatus.UNREACHABLE
    assert all(s is NodeStatus.OK for n, s in statuses.items() if n != stopped)
    assert took < 3.0 + 1.0  # within the deadline, and the hub's margin
    _until_all_answer(fed, within_s=15)  # and it links again once resumed


def test_a_killed_outbound_node_is_unreachable_at_once(fed: LocalFederation) -> None:
    _until_all_answer(fed, within_s=15)
    killed = OUTBOUND[1]
    fed.stop_process(killed, sig=signal.SIGKILL)
    try:
        began = time.monotonic()
        outcomes = _outcomes(fed, deadline_s=3.0)
        took = time.monotonic() - began
        statuses = {node: o.status for node, o in outcomes.items()}
        assert statuses[killed] is NodeStatus.UNREACHABLE
        assert "not connected (outbound-only node)" in outcomes[killed].message
        assert all(s is NodeStatus.OK for n, s in statuses.items() if n != killed)
        assert took < 4.0
    finally:
        setup = next(n for n in fed.nodes if n.name == killed)
        fed.start_node(setup)
    _until_all_answer(fed, within_s=20)


def test_an_auditor_verifies_an_outbound_nodes_ledger_through_the_relay(
    fed: LocalFederation,
) -> None:
    _until_all_answer(fed, within_s=15)
    auditor = load_identity(fed.identity_dir(Role.AUDITOR, AUDITOR_NAME))
    source = open_relayed(OUTBOUND[0], fed.hub_address, auditor)
    assert source.node == OUTBOUND[0]
    assert "signed by the node's certificate" in source.key_origin
    result = verification.verify(source, ca_pem=auditor.ca_pem)
    assert result.ok, result.anomalies
    assert result.released >= 1


def test_chc_audit_verify_reads_every_node_outbound_ones_through_the_hub(
    fed: LocalFederation,
) -> None:
    _until_all_answer(fed, within_s=15)
    identity = fed.identity_dir(Role.AUDITOR, AUDITOR_NAME)
    args = ["verify", "--hub", fed.hub_address, "--identity", str(identity), "--json"]
    run = CliRunner().invoke(audit_app, args)
    assert run.exit_code == 0, run.output
    results = {r["node"]: r for r in json.loads(run.stdout)}
    assert set(results) == {r.slug for r in synth.REGIONS}
    for name in OUTBOUND:
        assert results[name]["source"] == f"{name}@{fed.hub_address} (relayed)"
    assert all(r["ok"] for r in results.values())


def test_a_ledger_longer_than_the_stream_window_reaches_a_slow_reader_whole(
    fed: LocalFederation,
) -> None:
    """The relay runs under flow control: the node sends only as the hub grants credit, so
    an auditor that pauses holds up the node, not the hub's memory. Were the node to send
    regardless, the hub would end the stream (RESOURCE_EXHAUSTED) during the pause; were
    the hub not to grant more, the stream would stall after the first window."""
    _until_all_answer(fed, within_s=15)
    node = OUTBOUND[0]
    small = Query(view="persons", rho=0.001)
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        while len(ledger_bodies(fed.ledger_path(node))) < 3 * STREAM_WINDOW + 7:
            client.query(small, deadline_s=10)
    expected = sorted(ledger_bodies(fed.ledger_path(node)))
    auditor = load_identity(fed.identity_dir(Role.AUDITOR, AUDITOR_NAME))
    channel = secure_channel(fed.hub_address, auditor, server_name="hub")
    stream = link_pb2_grpc.LedgerRelayStub(channel).StreamNodeLedger(
        link_pb2.NodeLedgerRequest(node=node), timeout=60
    )
    first = next(stream)
    time.sleep(2.0)  # the node fills the window meanwhile, then waits for credit
    rest = list(stream)
    channel.close()
    entries = (first, *rest)
    assert entries[-1].head  # the signed head: the stream ran to its end
    got = [e.sequence for e in entries if not e.head]
    assert got[: len(expected)] == expected  # entries written since are welcome too
    assert got == sorted(set(got))
    # And the chain verifies end to end, as ever.
    result = verification.verify(
        open_relayed(node, fed.hub_address, auditor), ca_pem=auditor.ca_pem
    )
    assert result.ok, result.anomalies


def test_ledger_streams_through_the_relay_are_capped_and_never_hold_up_queries(
    fed: LocalFederation,
) -> None:
    """An auditor that opens streams and stops reading holds at most MAX_LINK_STREAMS of a
    node's stream workers, which are not its query workers: more streams are refused, and
    the node still answers queries meanwhile."""
    _until_all_answer(fed, within_s=15)
    node = OUTBOUND[0]
    auditor = load_identity(fed.identity_dir(Role.AUDITOR, AUDITOR_NAME))
    channel = secure_channel(fed.hub_address, auditor, server_name="hub")
    relay = link_pb2_grpc.LedgerRelayStub(channel)
    request = link_pb2.NodeLedgerRequest(node=node)
    held = [relay.StreamNodeLedger(request, timeout=60) for _ in range(MAX_LINK_STREAMS)]
    for stream in held:
        next(stream)  # each is under way, and then not read
    with pytest.raises(grpc.RpcError) as info:
        next(relay.StreamNodeLedger(request, timeout=60))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"to {MAX_LINK_STREAMS} readers" in (info.value.details() or "")
    assert _statuses(fed)[node] is NodeStatus.OK
    for stream in held:
        stream.cancel()
    # A reader gone frees its place: a new stream runs whole.
    deadline = time.monotonic() + 10
    entries, codes = [], []
    while not entries and time.monotonic() < deadline:
        try:
            entries = list(relay.StreamNodeLedger(request, timeout=60))
        except grpc.RpcError as exc:
            codes.append(exc.code())  # the cancelled streams' places are freed as they end
            time.sleep(0.1)
    channel.close()
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert entries, "the cancelled streams kept their places"
    assert entries[-1].head
