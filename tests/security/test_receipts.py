"""What the analyst is shown a node charged is what that node's ledger recorded (issue 10.3).

Two real nodes and a hub on loopback, one node (VICTIM) behind the userspace fault proxy of
tests/faults (its replies delayed past the deadline) or stopped with SIGSTOP. Whatever
happens, each node's displayed rho equals its ledger's change, or is marked unknown (with
the most it could be) when the node could not say; `chc query --resend FILE` later reads
the kept releases and charges nothing more; a fetch-only re-send never computes, charges or
consumes the envelope.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import Result
from rich.console import Console
from typer.testing import CliRunner

from coordinator.analyst import report
from coordinator.analyst.client import Federation, load_envelope
from coordinator.cli import app
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols.cli import ExitCode
from queries.results import FederatedResult, NodeOutcome, NodeStatus
from queries.spec import Query
from tests.faults._invariants import ledger_bodies, released
from tests.faults._proxy import FaultProxy

pytestmark = pytest.mark.integration

REGIONS = ("nenc", "nwc")
VICTIM = "nwc"
RHO = 0.01


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, FaultProxy]]:
    root = tmp_path_factory.mktemp("receipts")
    setups = []
    for slug in REGIONS:
        folder = root / "data" / slug
        synth.generate_region(synth.region_by_slug(slug), 1_000, folder, seed=7)
        setups.append(NodeSetup(name=slug, omop=folder, total_rho=100.0))
    with FaultProxy() as proxy:
        fed = LocalFederation(
            workdir=root,
            nodes=tuple(setups),
            deadline_ms=5_000,
            hub_addresses={VICTIM: proxy.address},
        )
        with fed:
            proxy.upstream = ("127.0.0.1", fed.node_port(VICTIM))
            yield fed, proxy


@pytest.fixture
def fed(link: tuple[LocalFederation, FaultProxy]) -> Iterator[LocalFederation]:
    """The federation, its proxy without latency before and after each test, and the hub's
    channels and catalog cache warm (so the pooling check's Describe adds no delay)."""
    federation, proxy = link
    proxy.latency_s = 0.0
    run = chc(federation, "query", "--view", "persons", "--rho", str(RHO), "--json")
    assert run.exit_code == ExitCode.OK, run.output
    yield federation
    proxy.latency_s = 0.0


def chc(fed: LocalFederation, *args: str) -> Result:
    hub = ["--hub", fed.hub_address, "--identity", str(fed.analyst_identity)]
    return CliRunner().invoke(app, [*args, *hub])


def ledger_rho(fed: LocalFederation) -> dict[str, float]:
    """Each node's released rho, read from its ledger file."""
    return {
        s.name: sum(b["rho"] for b in released(ledger_bodies(fed.ledger_path(s.name))))
        for s in fed.nodes
    }


def nodes_of(run: Result) -> dict[str, dict[str, Any]]:
    assert "Traceback" not in run.output, run.output
    return {n["node"]: n for n in json.loads(run.stdout)["nodes"]}


def check_receipts(shown: dict[str, dict[str, Any]], change: dict[str, float]) -> None:
    """Each node's displayed rho is its ledger's change, or unknown and at most the query's."""
    for name, moved in change.items():
        node = shown[name]
        if node["charge_unknown"]:
            assert node["rho_spent"] is None, node
            assert node["rho_at_most"] == pytest.approx(RHO), node
            assert moved <= RHO + 1e-12, (name, moved)
        else:
            assert node["rho_spent"] == pytest.approx(moved, abs=1e-12), (name, node, moved)


def query_args(envelope: Path, deadline: float) -> list[str]:
    return [
        "query",
        "--view",
        "persons",
        "-g",
        "sex",
        "--rho",
        str(RHO),
        "--deadline",
        str(deadline),
        "--save-envelope",
        str(envelope),
        "--json",
    ]


def test_a_reply_that_comes_late_is_fetched_with_its_receipt(
    link: tuple[LocalFederation, FaultProxy], fed: LocalFederation, tmp_path: Path
) -> None:
    # Each way 0.4 s: the node gets the query with about 0.4 s left, charges at once (well
    # within it) and replies, and the reply reaches the hub after its 0.4 s deadline. The
    # hub's fetch-only re-send then comes back within its 1 s grace (0.8 s round trip).
    _, proxy = link
    before = ledger_rho(fed)
    proxy.latency_s = 0.4
    envelope = tmp_path / "envelope.bin"
    run = chc(fed, *query_args(envelope, 0.4))
    proxy.latency_s = 0.0
    assert run.exit_code == ExitCode.OK, run.output
    after = ledger_rho(fed)
    change = {n: after[n] - before[n] for n in after}
    shown = nodes_of(run)
    check_receipts(shown, change)
    victim = shown[VICTIM]
    # Before the fix the victim was timed_out with rho_spent 0 while its ledger rose by RHO.
    assert change[VICTIM] == pytest.approx(RHO)
    assert victim["status"] == "ok", victim
    assert victim["resent"], victim
    assert "after the deadline" in victim["message"], victim
    assert victim["ledger_sequence"] is not None, victim
    assert victim["node_query_id"], victim
    assert json.loads(run.stdout)["rho_spent_in_all"]["unknown_nodes"] == []


def test_an_unknown_charge_is_shown_unknown_then_resend_reads_it_at_no_cost(
    link: tuple[LocalFederation, FaultProxy], fed: LocalFederation, tmp_path: Path
) -> None:
    # Each way 1.6 s: the query reaches the node with about 1 s left (it charges), but
    # neither its reply nor the hub's re-send (sent at 1 s, 1 s grace) can come back in time.
    _, proxy = link
    before = ledger_rho(fed)
    proxy.latency_s = 1.6
    envelope = tmp_path / "envelope.bin"
    run = chc(fed, *query_args(envelope, 1.0))
    proxy.latency_s = 0.0
    assert run.exit_code == ExitCode.OK, run.output  # the other node answered
    shown = nodes_of(run)
    victim = shown[VICTIM]
    assert victim["status"] == "timed_out", victim
    assert victim["charge_unknown"], victim
    assert victim["rho_spent"] is None
    assert victim["rho_at_most"] == pytest.approx(RHO)
    assert "not known" in victim["message"]
    assert "charges nothing" not in victim["message"]
    total = json.loads(run.stdout)["rho_spent_in_all"]
    assert total["unknown_nodes"] == [VICTIM]
    assert total["at_most"] == pytest.approx(total["known"] + RHO)
    # The table (re-sent, now that the node can answer) shows the kept releases.
    text = chc(fed, "query", "--resend", str(envelope))
    assert text.exit_code == ExitCode.OK, text.output
    assert "re-sent its kept release" in text.output, text.output
    # The node charged once, when the late query reached it; the re-sends charged nothing.
    after = ledger_rho(fed)
    change = {n: after[n] - before[n] for n in after}
    assert change == pytest.approx({n: RHO for n in change})
    check_receipts(shown, change)
    again = chc(fed, "query", "--resend", str(envelope), "--json")
    assert again.exit_code == ExitCode.OK, again.output
    assert ledger_rho(fed) == after
    fetched = nodes_of(again)
    for name, node in fetched.items():
        assert node["status"] == "ok", node
        assert node["resent"], node
        assert node["rho_spent"] == pytest.approx(change[name]), node
    # The same receipt as the first answer of the node that answered in time.
    other = next(n for n in REGIONS if n != VICTIM)
    assert fetched[other]["ledger_sequence"] == shown[other]["ledger_sequence"]


def test_a_stopped_node_is_unknown_and_resend_says_it_charged_nothing(
    fed: LocalFederation, tmp_path: Path
) -> None:
    before = ledger_rho(fed)
    envelope = tmp_path / "envelope.bin"
    os.kill(fed.pid(VICTIM), signal.SIGSTOP)
    try:
        run = chc(fed, *query_args(envelope, 1.0))
    finally:
        os.kill(fed.pid(VICTIM), signal.SIGCONT)
    assert run.exit_code == ExitCode.OK, run.output
    shown = nodes_of(run)
    assert shown[VICTIM]["charge_unknown"]
    assert shown[VICTIM]["rho_spent"] is None
    # Resumed, the node finds the query's deadline passed and refuses it at no cost; the
    # re-send finds no kept release, which it says means nothing was charged.
    again = chc(fed, "query", "--resend", str(envelope), "--json")
    assert again.exit_code == ExitCode.OK, again.output
    fetched = nodes_of(again)
    assert fetched[VICTIM]["status"] == "refused", fetched[VICTIM]
    assert "nothing was charged" in fetched[VICTIM]["message"]
    assert fetched[VICTIM]["rho_spent"] == 0.0
    after = ledger_rho(fed)
    change = {n: after[n] - before[n] for n in after}
    assert change[VICTIM] == 0.0
    check_receipts(shown, change)


def test_a_fetch_only_resend_never_runs_charges_or_uses_the_envelope(
    fed: LocalFederation,
) -> None:
    before = ledger_rho(fed)
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        envelope = client.sign(Query(view="persons", rho=RHO))
        early = client.resend(envelope, deadline_s=10)
        assert [o.status for o in early.nodes] == [NodeStatus.REFUSED] * len(REGIONS)
        assert all("nothing was charged" in o.message for o in early.nodes), early.nodes
        assert early.table.num_rows == 0
        assert ledger_rho(fed) == before
        # The nonce was not consumed: the envelope still runs, once.
        ran = client.run(envelope, deadline_s=10)
        assert all(o.status is NodeStatus.OK and not o.resent for o in ran.nodes), ran.nodes
        charged = ledger_rho(fed)
        assert charged == pytest.approx({n: before[n] + RHO for n in before})
        later = client.resend(envelope, deadline_s=10)
    assert all(o.resent and o.rho_charged == pytest.approx(RHO) for o in later.nodes)
    assert [o.ledger_sequence for o in later.nodes] == [o.ledger_sequence for o in ran.nodes]
    # The same kept noise, combined again: the same figures.
    assert later.table.equals(ran.table)
    assert ledger_rho(fed) == charged


def test_resend_refuses_a_file_that_is_not_an_envelope(
    fed: LocalFederation, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff" * 100)
    run = chc(fed, "query", "--resend", str(junk))
    assert run.exit_code != ExitCode.OK
    assert "is not a signed query envelope" in run.output
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    run = chc(fed, "query", "--resend", str(big))
    assert run.exit_code != ExitCode.OK
    assert "larger than" in run.output
    with pytest.raises(Exception, match="not a signed query envelope"):
        load_envelope(junk)


def test_the_table_shows_an_unknown_charge_and_does_not_total_it_as_0() -> None:
    result = FederatedResult(
        query_id="q",
        table=pa.table({"region": pa.array([], pa.string())}),
        nodes=(
            NodeOutcome(node="a", status=NodeStatus.OK, rho_charged=RHO, ledger_sequence=7),
            NodeOutcome(node="b", status=NodeStatus.TIMED_OUT, message="late", charge_unknown=True),
        ),
        partial=True,
    )
    out = io.StringIO()
    report.print_nodes(Console(file=out, width=200), result, rho=RHO)
    text = out.getvalue()
    assert f"unknown (at most {RHO:g})" in text, text
    assert "ledger #7" in text, text
    assert f"rho spent: {RHO:g} in all at the nodes that answered; not known at b" in text, text
    query = Query(view="persons", rho=RHO)
    nodes = report.result_to_dict(result, query)["nodes"]
    assert nodes[1]["rho_spent"] is None
    assert nodes[1]["rho_at_most"] == RHO
    assert nodes[0]["rho_spent"] == RHO
    assert nodes[0]["ledger_sequence"] == 7
