"""The ledger on a real federation: auditors read nodes directly, analysts see their budget,
parallel queries can never overspend a node, and a node enforces its lifetime cap and the
budget policy recorded in its ledger."""

from __future__ import annotations

import base64
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from coordinator.analyst.client import Federation
from coordinator.audit.sources import open_file, open_remote
from coordinator.audit.verification import verify
from coordinator.cli import app
from coordinator.local import synth
from coordinator.local.federation import (
    AUDITOR_NAME,
    HUB_NAME,
    FederationStartError,
    LocalFederation,
    NodeSetup,
)
from node.budget.accounting import Charge
from node.budget.ledger import SqliteLedger
from node.cli import app as node_app
from protocols import serde
from protocols.budget.changes import POLICY_RECORD
from protocols.budget.policy import BudgetPolicy
from protocols.process import read_ready_file
from protocols.security.envelope import sign_query
from protocols.security.pki import CA_FILE, Role, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.results import NodeStatus
from queries.spec import Query, canonical_bytes

pytestmark = pytest.mark.integration


def _identity_dir(fed: LocalFederation, role: Role) -> Path:
    names = {Role.AUDITOR: AUDITOR_NAME, Role.HUB: HUB_NAME}
    if role is Role.ANALYST:
        return fed.analyst_identity
    return fed.identity_dir(role, names[role])


def _stub(
    fed: LocalFederation, node: str, role: Role
) -> tuple[grpc.Channel, node_pb2_grpc.NodeStub]:
    identity = load_identity(_identity_dir(fed, role))
    channel = secure_channel(f"127.0.0.1:{fed.node_port(node)}", identity, server_name=node)
    return channel, node_pb2_grpc.NodeStub(channel)


def _execute(
    stub: node_pb2_grpc.NodeStub, fed: LocalFederation, query: Query
) -> tuple[node_pb2.QueryEnvelope, node_pb2.ExecuteResponse]:
    analyst = load_identity(fed.analyst_identity)
    envelope = serde.signed_query_to_proto(sign_query(analyst, canonical_bytes(query)))
    return envelope, stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=30)


def test_only_auditors_stream_the_ledger(federation: LocalFederation) -> None:
    for role in (Role.ANALYST, Role.HUB):
        channel, stub = _stub(federation, "gm", role)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamLedger(node_pb2.LedgerRequest(), timeout=10))
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        channel.close()
    channel, stub = _stub(federation, "gm", Role.AUDITOR)
    streamed = list(stub.StreamLedger(node_pb2.LedgerRequest(), timeout=10))
    channel.close()
    assert streamed[-1].head
    assert not any(e.head for e in streamed[:-1])


def test_every_release_has_its_entry(federation: LocalFederation) -> None:
    query = Query(view="asthma_children", rho=0.02, group_by=("sex",))
    channel, stub = _stub(federation, "nwc", Role.ANALYST)
    envelope, reply = _execute(stub, federation, query)
    channel.close()
    channel, stub = _stub(federation, "nwc", Role.AUDITOR)
    entries = {
        e.sequence: json.loads(e.body)
        for e in stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=10)
        if not e.head
    }
    channel.close()
    body = entries[reply.ledger_sequence]
    assert body["query_id"] == reply.query_id
    assert body["outcome"] == "released"
    assert body["analyst"] == envelope.analyst
    assert body["query"].encode() == envelope.query
    assert body["views"] == ["asthma_children"]
    assert body["rho"] == pytest.approx(reply.rho_charged)
    assert body["epsilon"] == pytest.approx(reply.epsilon)
    assert body["spent"]["period_rho"] == pytest.approx(reply.budget.rho_spent)
    assert body["caps"]["total_rho"] == reply.budget.rho_total
    recorded = node_pb2.QueryEnvelope.FromString(base64.b64decode(body["envelope"]))
    assert recorded == envelope


def test_auditor_reads_every_node_directly(federation: LocalFederation, tmp_path: Path) -> None:
    """`chc audit verify/export/report --hub`: the hub only says where the nodes are."""
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        fed.query(Query(view="persons", rho=0.01, group_by=("sex",)))
        with pytest.raises(Exception, match="did you mean"):
            fed.query(Query(view="asthma_child", rho=0.01))
    auditor = _identity_dir(federation, Role.AUDITOR)
    with Federation(federation.hub_address, auditor) as fed:
        addresses = fed.addresses()
    assert addresses == {
        n.name: f"127.0.0.1:{federation.node_port(n.name)}" for n in federation.nodes
    }
    runner = CliRunner()
    hub = ["--hub", federation.hub_address, "--identity", str(auditor)]
    run = runner.invoke(app, ["audit", "verify", *hub, "--json"])
    assert run.exit_code == 0, run.output
    results = json.loads(run.output)
    assert sorted(r["node"] for r in results) == sorted(addresses)
    for r in results:
        assert r["ok"], r["anomalies"]
        assert r["released"] >= 1
        assert r["refused"] >= 1
        assert r["notes"] == []  # analyst signatures were checked against the auditor's CA
    out = tmp_path / "exports"
    run = runner.invoke(app, ["audit", "export", *hub, "--out", str(out), "--format", "parquet"])
    assert run.exit_code == 0, run.output
    files = sorted(out.iterdir())
    assert [f.name for f in files] == sorted(f"{n}.parquet" for n in addresses)
    ca = federation.pki / CA_FILE
    run = runner.invoke(app, ["audit", "verify", *map(str, files), "--ca", str(ca)])
    assert run.exit_code == 0, run.output
    chart = tmp_path / "spend.svg"
    run = runner.invoke(app, ["audit", "report", *hub, "--chart", str(chart), "--json"])
    assert run.exit_code == 0, run.output
    rows = json.loads(run.output)
    assert {r["analyst"] for r in rows} >= {"demo-analyst"}
    assert {r["node"] for r in rows} == set(addresses)
    run = runner.invoke(app, ["audit", "report", *hub, "--by", "node", "--chart", str(chart)])
    assert run.exit_code == 0, run.output
    assert all(f">{n}<" in chart.read_text() for n in addresses)


def test_analysts_see_their_remaining_budget(federation: LocalFederation) -> None:
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        fed.query(Query(view="persons", rho=0.01))
        budgets = fed.budget()
    assert sorted(b.node for b in budgets) == sorted(n.name for n in federation.nodes)
    for b in budgets:
        assert b.status is NodeStatus.OK
        assert b.budget is not None
        assert b.analyst is not None
        assert 0.01 <= b.analyst.rho_spent <= b.budget.rho_spent + 1e-12
        # No per-analyst cap is configured: the node's remainder is the analyst's.
        assert b.analyst.rho_remaining == pytest.approx(b.budget.rho_remaining)
    run = CliRunner().invoke(
        app,
        ["budget", "--hub", federation.hub_address, "--identity", str(federation.analyst_identity)],
    )
    assert run.exit_code == 0, run.output
    for n in federation.nodes:
        assert n.name in run.output


def test_parallel_queries_never_overspend(fresh_federation: LocalFederation) -> None:
    """N parallel queries whose sum exceeds the node's total: exactly those that fit pass."""
    fed = fresh_federation  # total_rho 1.0, max_rho_per_query 0.5 at every node
    node = "yh"
    query = Query(view="persons", rho=0.07, group_by=("sex",))
    channel, stub = _stub(fed, node, Role.ANALYST)
    analyst = load_identity(fed.analyst_identity)
    probe = serde.signed_query_to_proto(sign_query(analyst, canonical_bytes(query)))
    rho = stub.Explain(node_pb2.ExecuteRequest(envelope=probe), timeout=10).rho
    fits = 0
    while (fits + 1) * rho <= 1.0 * (1 + 1e-9):
        fits += 1
    n = fits + 8
    envelopes = [
        serde.signed_query_to_proto(sign_query(analyst, canonical_bytes(query))) for _ in range(n)
    ]
    start = threading.Barrier(n)
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def run(envelope: node_pb2.QueryEnvelope) -> None:
        start.wait()
        try:
            stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=60)
        except grpc.RpcError as exc:
            code = exc.code()
        else:
            code = grpc.StatusCode.OK
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=run, args=(e,)) for e in envelopes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    channel.close()
    assert codes.count(grpc.StatusCode.OK) == fits
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == n - fits
    auditor = load_identity(_identity_dir(fed, Role.AUDITOR))
    source = open_remote(node, f"127.0.0.1:{fed.node_port(node)}", auditor)
    result = verify(source, ca_pem=auditor.ca_pem)
    assert result.ok, [str(a) for a in result.anomalies]
    assert (result.released, result.refused) == (fits, n - fits)
    assert result.rho_released <= 1.0 * (1 + 1e-9)
    assert result.rho_released == pytest.approx(fits * rho)


def _bodies(ledger: Path) -> list[dict[str, object]]:
    return [json.loads(e.body) for e in open_file(ledger).read() if not e.head]


def test_a_node_enforces_its_lifetime_cap_and_its_recorded_policy(tmp_path: Path) -> None:
    """Five years of spend before this run leave 0.05 of the default lifetime cap (5 x 1.0):
    a query of 0.07 is refused at zero cost and recorded; raising total_rho stops the node
    from starting until the custodian gives a reason, which the ledger then holds."""
    region = synth.REGIONS[0]
    folder = tmp_path / "data" / region.slug
    synth.generate_region(region, 3_000, folder, seed=7)
    setup = NodeSetup(name=region.slug, omop=folder, total_rho=1.0, max_rho_per_query=0.5)
    ledger = tmp_path / "conf" / f"{region.slug}.ledger.sqlite"  # beside the node.toml
    when = datetime(2020, 6, 1, tzinfo=UTC)
    seeded = SqliteLedger(
        ledger,
        node=region.slug,
        policy=BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5),
        clock=lambda: when,
    )
    for year in range(2020, 2025):
        when = datetime(year, 6, 1, tzinfo=UTC)
        for i in range(2):
            seeded.charge(Charge(f"old-{year}-{i}", "demo-analyst", b"{}", b"", (), 0.495, 1.0))
    seeded.close()
    with LocalFederation(workdir=tmp_path, nodes=(setup,), deadline_ms=5_000) as fed:
        channel, stub = _stub(fed, region.slug, Role.ANALYST)
        query = Query(view="persons", rho=0.07, group_by=("sex",))
        analyst = load_identity(fed.analyst_identity)
        probe = serde.signed_query_to_proto(sign_query(analyst, canonical_bytes(query)))
        explained = stub.Explain(node_pb2.ExecuteRequest(envelope=probe), timeout=10)
        assert explained.rho == pytest.approx(0.07)
        assert explained.budget.rho_spent == 0.0  # nothing yet this financial year...
        assert explained.budget.rho_total == pytest.approx(0.05)  # ...but little left for life
        with pytest.raises(grpc.RpcError) as info:
            _execute(stub, fed, query)
        channel.close()
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert "remaining lifetime budget of 0.05" in details
        assert "a cap of 5 over the node's life" in details
        fed.stop_process(region.slug)
        refused = _bodies(ledger)[-1]
        assert (refused["outcome"], refused["code"], refused["rho"]) == (
            "refused",
            "RESOURCE_EXHAUSTED",
            0.0,
        )
        assert refused["reason"] == details

        fed.nodes = (dataclasses.replace(setup, total_rho=2.0),)
        with pytest.raises(FederationStartError, match=r"budget\.total_rho from 1 to 2"):
            fed.restart_node(region.slug)
        config = tmp_path / "conf" / f"{region.slug}.toml"
        reason = "approved by the Caldicott guardian on 2026-04-02 (DSA v2)"
        run = CliRunner().invoke(
            node_app, ["check", "--config", str(config), "--allow-policy-loosening", reason]
        )
        assert run.exit_code == 0, run.output
        assert "LOOSENS the policy of entry 1 (budget.total_rho from 1 to 2" in run.output
        assert _bodies(ledger)[-1] == refused  # check records nothing
        ready = tmp_path / "run" / "override.ready"
        args = ["serve", "--config", str(config), "--ready-file", str(ready)]
        node = subprocess.Popen(
            [sys.executable, "-m", "node", *args, "--allow-policy-loosening", reason],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while read_ready_file(ready) is None:
                assert node.poll() is None, node.communicate()[1].decode()
                assert time.monotonic() < deadline, "the node did not start"
                time.sleep(0.05)
        finally:
            node.send_signal(signal.SIGTERM)
            _, err = node.communicate(timeout=30)
        assert "LOOSENS the policy of entry 1" in err.decode()  # the node's log says so too
    policy = _bodies(ledger)[-1]
    assert policy["record"] == POLICY_RECORD
    assert policy["override"] == {"reason": reason}
    assert policy["loosened"] == [
        {"field": "budget.total_rho", "from": 1.0, "to": 2.0},
        {"field": "budget.lifetime_rho", "from": 5.0, "to": 10.0},
    ]
