"""Latency, loss and a cut link made by `tc netem` in a network namespace the test creates.

The hub reaches one node across a veth link into the test's own namespace and back: a proxy
inside the namespace (tests/faults/_proxy.py, no faults of its own) forwards to one in the
root namespace, which forwards to the node on loopback. netem on the namespace's end of
the link delays or drops real packets; TCP, TLS and gRPC deal with it as across a network.

Skipped, with the reason, where namespaces cannot be made or the kernel has no netem (as on
the machines this was written on; test_network.py makes the same faults in userspace there).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
from tests.faults._netns import NETEM_MISSING, Namespace, unavailable
from tests.faults._proxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.integration]

VICTIM = "gm"
DEADLINE_S = 2.0
INNER_PORT = 47_000  # in the test's own namespace: nothing else listens there
QUERY = Query(view="persons", rho=0.001, group_by=("sex",))


@contextmanager
def _namespace_with_netem() -> Iterator[Namespace]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with Namespace() as ns:
        probe = ns.netem("delay", "1ms")
        if probe.returncode != 0:
            if NETEM_MISSING in probe.stderr:
                pytest.skip(f"tc netem is not available in this kernel: tc says {NETEM_MISSING!r}")
            pytest.fail(f"tc netem failed in {ns.name}: {probe.stderr.strip()}")
        ns.clear_netem()
        yield ns


@contextmanager
def _federation_across(ns: Namespace, root: Path) -> Iterator[LocalFederation]:
    """Four nodes; the hub reaches VICTIM through the namespace and back."""
    folders = synth.generate_federation(4_000, root / "data", seed=9)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], total_rho=1e3, max_rho_per_query=1.0)
        for r in synth.REGIONS
    )
    with FaultProxy(host=ns.root_ip) as outer:
        ns.start_proxy(f"{ns.inner_ip}:{INNER_PORT}", outer.address)
        fed = LocalFederation(
            workdir=root,
            nodes=setups,
            deadline_ms=int(DEADLINE_S * 1000),
            hub_addresses={VICTIM: f"{ns.inner_ip}:{INNER_PORT}"},
        )
        with fed:
            outer.upstream = ("127.0.0.1", fed.node_port(VICTIM))
            yield fed


def _query(fed: LocalFederation, got: list[Receipt]) -> tuple[FederatedResult, NodeOutcome]:
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        started = time.monotonic()
        result = client.query(QUERY, deadline_s=DEADLINE_S)
        elapsed = time.monotonic() - started
    assert elapsed <= DEADLINE_S + DEADLINE_MARGIN_S, elapsed
    got += receipts(result, ANALYST_NAME)
    return result, next(o for o in result.nodes if o.node == VICTIM)


def _until_ok(fed: LocalFederation, got: list[Receipt], timeout_s: float = 30) -> float:
    """Query until VICTIM answers; the last query's round trip in seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.monotonic()
        _, outcome = _query(fed, got)
        if outcome.status is NodeStatus.OK:
            return time.monotonic() - started
        assert time.monotonic() < deadline, outcome
        time.sleep(0.2)


def _netem(ns: Namespace, *spec: str) -> None:
    done: subprocess.CompletedProcess[str] = ns.netem(*spec)
    assert done.returncode == 0, done.stderr


def test_netem_latency_loss_and_cut_keep_every_charge(tmp_path: Path) -> None:
    with _namespace_with_netem() as ns, _federation_across(ns, tmp_path) as fed:
        got: list[Receipt] = []
        _until_ok(fed, got)
        # Latency: 300 ms each way on the namespace's side; the query still answers.
        _netem(ns, "delay", "300ms")
        assert _until_ok(fed, got) >= 0.6
        # Loss of 10% of packets: TCP retransmits; answered or reported, never doubled.
        _netem(ns, "loss", "10%")
        for _ in range(10):
            _, outcome = _query(fed, got)
            assert outcome.status in (NodeStatus.OK, NodeStatus.TIMED_OUT, NodeStatus.UNREACHABLE)
        # A cut link: every packet dropped; the node is reported within the deadline.
        _netem(ns, "loss", "100%")
        result, outcome = _query(fed, got)
        assert result.partial
        assert outcome.status in (NodeStatus.TIMED_OUT, NodeStatus.UNREACHABLE), outcome
        assert VICTIM in outcome.message
        ns.clear_netem()
        _until_ok(fed, got)
        check_all(fed, got)
        check_budget_matches_ledgers(fed, fed.analyst_identity, ANALYST_NAME)
