"""A node that charged and then was lost before its reply reached the hub is reported with
its charge unknown, never as having charged nothing (the analyst's "rho spent" would be a
silent 0 against a charge in the node's ledger).

The hub reaches gm through a stand-in with gm's certificate that passes each call on to the
real gm node (as the hub, with the hub's certificate) and, on the first Execute, lets the
real node charge and then goes down before replying: the hub's call fails UNAVAILABLE after
it reached the node, and every retry fails to connect. A node that was never reached (its
address refuses connections from the start) still charges nothing and says so.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.analyst.client import Federation, FitStoppedError
from coordinator.local import synth
from coordinator.local.federation import HUB_NAME, LocalFederation, NodeSetup
from protocols.security.pki import Role, load_identity
from protocols.security.tls import secure_channel, server_credentials
from protocols.v1 import node_pb2_grpc
from protocols.version import metadata
from queries.model import Covariate, Family, ModelSpec
from queries.results import NodeStatus
from queries.spec import Filter, Query
from tests.faults._invariants import ledger_bodies, released

pytestmark = pytest.mark.integration

LOST = "gm"
QUERY = Query(view="persons", rho=0.01, group_by=("sex",))
PERSONS = 20_000  # enough for a model's design check (every level well filled)
MODEL = ModelSpec(
    view="copd",
    outcome="admitted",
    family=Family.BINOMIAL,
    covariates=(Covariate("sex"), Covariate("age")),
    rho=20.0,
    where=(Filter("sex", ("female", "male")),),
    iterations=2,
)


class Vanishing(node_pb2_grpc.NodeServicer):
    """Passes calls on to the real node; goes down once the first Execute has been charged,
    and loses the reply to the first FitStep of step 1 (the node charged it) once."""

    def __init__(self) -> None:
        self.fed: LocalFederation | None = None  # set when its federation is made
        self.server: grpc.Server | None = None
        self.executed = threading.Event()
        self.fit_steps: list[int] = []  # the steps asked for, retries included
        self._stub: node_pb2_grpc.NodeStub | None = None

    def _node(self) -> node_pb2_grpc.NodeStub:
        assert self.fed is not None
        if self._stub is None:  # the real node's port is known once the federation runs
            hub = load_identity(self.fed.identity_dir(Role.HUB, HUB_NAME))
            address = f"127.0.0.1:{self.fed.node_port(LOST)}"
            channel = secure_channel(address, hub, server_name=LOST)
            self._stub = node_pb2_grpc.NodeStub(channel)
        return self._stub

    def Describe(self, request: Any, _context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._node().Describe(request, timeout=10, metadata=metadata())

    def Explain(self, request: Any, _context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._node().Explain(request, timeout=10, metadata=metadata())

    def FitStep(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        reply = self._node().FitStep(request, timeout=60, metadata=metadata())
        self.fit_steps.append(request.step)
        if self.fit_steps == [0, 1]:  # charged at the node; its reply lost on the way back
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by the stand-in")
        return reply

    def Execute(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        reply = self._node().Execute(request, timeout=10, metadata=metadata())
        assert reply.ledger_sequence > 0  # charged in the real node's ledger
        self._go_down(context)

    def _go_down(self, context: grpc.ServicerContext) -> None:
        """Stop serving with this call in hand: the caller's connection is lost."""
        self.executed.set()
        server = self.server
        assert server is not None
        threading.Thread(target=server.stop, args=(0,), daemon=True).start()
        context.abort(grpc.StatusCode.UNAVAILABLE, "going down")  # the stop cancels it first


class VanishingAtFit(Vanishing):
    """Goes down once step 1 of a fit has been charged at the real node."""

    def FitStep(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        reply = self._node().FitStep(request, timeout=60, metadata=metadata())
        self.fit_steps.append(request.step)
        if request.step == 1:
            self._go_down(context)
        return reply


@contextmanager
def _federation(root: Path, *, front: Vanishing | None) -> Iterator[LocalFederation]:
    regions = tuple(r for r in synth.REGIONS if r.slug in ("nenc", LOST))
    folders = synth.generate_federation(PERSONS, root / "data", seed=5)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], total_rho=100.0, max_rho_per_query=50.0)
        for r in regions
    )
    fed = LocalFederation(workdir=root, nodes=setups, deadline_ms=30_000)
    fed.create_pki()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if front is not None:
        front.fed, front.server = fed, server
        node_pb2_grpc.add_NodeServicer_to_server(front, server)
    identity = load_identity(fed.identity_dir(Role.NODE, LOST))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(identity))
    if front is not None:
        server.start()
    # Without a front nothing ever listens there: every call fails to connect.
    fed.hub_addresses[LOST] = f"127.0.0.1:{port}"
    try:
        with fed:
            yield fed
    finally:
        server.stop(None)


def _charges(fed: LocalFederation) -> list[dict[str, Any]]:
    return released(ledger_bodies(fed.ledger_path(LOST)))


def test_a_node_lost_after_it_charged_is_reported_with_its_charge_unknown(
    tmp_path: Path,
) -> None:
    front = Vanishing()
    with _federation(tmp_path, front=front) as fed:
        before = len(_charges(fed))
        with Federation(fed.hub_address, fed.analyst_identity) as client:
            result = client.query(QUERY, deadline_s=5)
        charged = _charges(fed)[before:]
    assert front.executed.is_set()
    assert len(charged) == 1, charged  # the real node did charge, once
    outcome = next(o for o in result.nodes if o.node == LOST)
    assert outcome.status is NodeStatus.UNREACHABLE, outcome
    assert outcome.charge_unknown, outcome
    assert "whether it charged is not known" in outcome.message, outcome.message
    assert f"at most rho {QUERY.rho:g}" in outcome.message
    assert result.partial


def test_a_node_never_reached_charged_nothing_and_says_so(tmp_path: Path) -> None:
    with _federation(tmp_path, front=None) as fed:
        before = len(_charges(fed))
        with Federation(fed.hub_address, fed.analyst_identity) as client:
            result = client.query(QUERY, deadline_s=5)
        assert len(_charges(fed)) == before
    outcome = next(o for o in result.nodes if o.node == LOST)
    assert outcome.status is NodeStatus.UNREACHABLE, outcome
    assert not outcome.charge_unknown, outcome
    assert outcome.rho_charged == 0
    assert "whether it charged" not in outcome.message


def test_a_fit_step_whose_reply_was_lost_is_asked_again_and_charged_once(
    tmp_path: Path,
) -> None:
    front = Vanishing()
    with _federation(tmp_path, front=front) as fed:
        with Federation(fed.hub_address, fed.analyst_identity) as client:
            fitted = client.fit(MODEL, deadline_s=30)
        bodies = [b for b in ledger_bodies(fed.ledger_path(LOST)).values() if "fit" in b]
    assert front.fit_steps[:3] == [0, 1, 1], front.fit_steps  # step 1 asked again
    outcome = next(o for o in fitted.nodes if o.node == LOST)
    assert outcome.status is NodeStatus.OK, outcome
    assert not fitted.partial
    steps = [b["fit"]["step"] for b in bodies if b["outcome"] == "released"]
    assert steps == list(range(MODEL.steps)), steps  # each step charged once, none twice
    assert outcome.rho_charged == pytest.approx(sum(b["rho"] for b in bodies), rel=1e-9)


def test_a_fit_that_stops_where_a_node_may_have_charged_says_so(tmp_path: Path) -> None:
    front = VanishingAtFit()
    with _federation(tmp_path, front=front) as fed:
        with (
            Federation(fed.hub_address, fed.analyst_identity) as client,
            pytest.raises(FitStoppedError) as info,
        ):
            client.fit(MODEL, deadline_s=10)
        bodies = [b for b in ledger_bodies(fed.ledger_path(LOST)).values() if "fit" in b]
    steps = [b["fit"]["step"] for b in bodies if b["outcome"] == "released"]
    assert steps == [0, 1]  # gm did charge step 1 before it was lost
    message = str(info.value)
    assert f"whether {LOST} charged step 1 is not known" in message, message
    assert "`chc budget` shows every charge" in message
