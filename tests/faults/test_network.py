"""Network faults between the hub and one node: latency, lost connections and a cut link.

The hub dials one node through a userspace TCP proxy (tests/faults/_proxy.py; the kernel
has no netem, see test_netem.py), and mutual TLS runs through it unchanged. In every case
the analyst hears back within the deadline, each release has its one ledger entry, no
envelope is charged twice, the ledgers verify, and `chc budget` shows every charge, even
one whose answer the network lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import ANALYST_NAME, LocalFederation, NodeSetup
from queries.results import FederatedResult, NodeOutcome, NodeStatus
from queries.spec import Query
from tests.faults._invariants import (
    DEADLINE_MARGIN_S,
    Receipt,
    check_all,
    check_budget_matches_ledgers,
    receipts,
)
from tests.faults._proxy import FaultProxy
from tests.faults._traffic import Traffic

pytestmark = [pytest.mark.faults, pytest.mark.integration]

VICTIM = "yh"
DEADLINE_S = 2.0
QUERY = Query(view="persons", rho=0.001, group_by=("sex",))


class Link:
    """A federation whose hub reaches VICTIM through a fault proxy, and what it received."""

    def __init__(self, fed: LocalFederation, proxy: FaultProxy) -> None:
        self.fed = fed
        self.proxy = proxy
        self.received: list[Receipt] = []

    def query(self) -> tuple[FederatedResult, float]:
        """One query through the hub: its result and how long the analyst waited."""
        with Federation(self.fed.hub_address, self.fed.analyst_identity) as client:
            started = time.monotonic()
            result = client.query(QUERY, deadline_s=DEADLINE_S)
            elapsed = time.monotonic() - started
        self.received += receipts(result, ANALYST_NAME)
        assert elapsed <= DEADLINE_S + DEADLINE_MARGIN_S, elapsed
        return result, elapsed

    def check(self) -> None:
        """No charge lost or doubled, ledgers verify, `chc budget` shows every charge."""
        check_all(self.fed, self.received)
        check_budget_matches_ledgers(self.fed, self.fed.analyst_identity, ANALYST_NAME)


def _victim(result: FederatedResult) -> NodeOutcome:
    return next(o for o in result.nodes if o.node == VICTIM)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    """One federation for the module (each test heals the link when it is done)."""
    root = tmp_path_factory.mktemp("net")
    folders = synth.generate_federation(4_000, root / "data", seed=5)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], total_rho=1e3, max_rho_per_query=1.0)
        for r in synth.REGIONS
    )
    with FaultProxy() as proxy:
        fed = LocalFederation(
            workdir=root,
            nodes=setups,
            deadline_ms=int(DEADLINE_S * 1000),
            hub_addresses={VICTIM: proxy.address},
        )
        with fed:
            proxy.upstream = ("127.0.0.1", fed.node_port(VICTIM))
            yield Link(fed, proxy)


@pytest.fixture
def link(shared: Link) -> Iterator[Link]:
    """The shared federation with a healthy link to start with, and again afterwards."""
    yield shared
    shared.proxy.latency_s = 0.0
    shared.proxy.loss = 0.0
    shared.proxy.heal()


def _wait_healthy(link: Link, timeout_s: float = 30.0) -> FederatedResult:
    """Query until the victim answers again (a healed link reconnects with backoff)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result, _ = link.query()
        if _victim(result).status is NodeStatus.OK:
            return result
        assert time.monotonic() < deadline, f"{VICTIM} never answered again: {_victim(result)}"
        time.sleep(0.2)


def test_latency_within_the_deadline_delays_but_answers(link: Link) -> None:
    _wait_healthy(link)
    link.proxy.latency_s = 0.3
    result, elapsed = link.query()
    assert not result.partial
    assert _victim(result).status is NodeStatus.OK
    # The request and its answer each waited 0.3 s in the proxy: the delay was real.
    assert elapsed >= 0.6
    link.check()


def test_latency_beyond_the_deadline_times_out_and_its_charge_shows(link: Link) -> None:
    """A node whose answer arrives too late is timed_out; if it charged, `chc budget` says so.

    The request reaches the node after 1.2 s, before the 2 s deadline, so the node may charge
    and answer; its answer reaches the hub 2.4 s after it asked, after the deadline.
    """
    _wait_healthy(link)
    link.proxy.latency_s = 1.2
    result, _ = link.query()
    assert result.partial
    outcome = _victim(result)
    assert outcome.status is NodeStatus.TIMED_OUT, outcome
    assert VICTIM in outcome.message
    assert [o.status for o in result.nodes].count(NodeStatus.OK) == 3
    link.proxy.latency_s = 0.0
    time.sleep(1.5)  # the late answer drains through the proxy
    link.check()


def test_lost_connections_never_double_a_charge(link: Link) -> None:
    """Connections reset under traffic: retried or reported, never charged twice."""
    _wait_healthy(link)
    link.proxy.loss = 0.05
    with Traffic(link.fed.hub_address, link.fed.analyst_identity, QUERY, DEADLINE_S) as traffic:
        traffic.wait_for("60 results", lambda s: len(s) >= 60, 120)
        link.proxy.loss = 0.0
    sent = traffic.snapshot()
    assert link.proxy.stats.lost > 0, "no connection was lost: the fault never happened"
    for s in sent:
        assert s.result is not None, s.error
        assert s.elapsed_s <= DEADLINE_S + DEADLINE_MARGIN_S
        outcome = _victim(s.result)
        if outcome.status is not NodeStatus.OK:
            assert outcome.status in (NodeStatus.UNREACHABLE, NodeStatus.TIMED_OUT), outcome
            assert VICTIM in outcome.message
    link.received += traffic.receipts(ANALYST_NAME)
    _wait_healthy(link)
    link.check()


def test_cut_link_reports_the_node_in_time_then_recovers(link: Link) -> None:
    _wait_healthy(link)
    link.proxy.cut()
    for _ in range(2):
        result, elapsed = link.query()
        outcome = _victim(result)
        assert result.partial
        assert outcome.status in (NodeStatus.TIMED_OUT, NodeStatus.UNREACHABLE), outcome
        assert VICTIM in outcome.message
        assert elapsed >= DEADLINE_S * 0.9  # a black hole: silence until the deadline
    assert link.proxy.stats.discarded > 0
    link.proxy.heal()
    result = _wait_healthy(link)
    assert not result.partial
    link.check()
