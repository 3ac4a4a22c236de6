"""A hub of protocol 1.1 with a node of 1.0 (recorded answers), and refusals across majors.

The node "gm" here is a replay of what a node of the last 1.0 release answered, recorded by
tests/fixtures/protocol_1_0/record.py over mutual TLS; it serves those bytes with gm's real
certificate, so the hub talks to it exactly as to a 1.0 node. It also records what it is
sent: a 1.0 node does not know ExecuteRequest.kept_only, and would run (and charge) a query
sent with it, so the hub must never send it one.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols import serde
from protocols.security.pki import Role, load_identity
from protocols.security.tls import secure_channel, server_credentials
from protocols.v1 import node_pb2, node_pb2_grpc
from protocols.version import CURRENT, HEADER
from queries.combine import POOLED
from queries.results import NodeStatus
from queries.spec_io import from_json

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).parents[1] / "fixtures" / "protocol_1_0"
OLD = "gm"


@dataclass
class ReplayNode(node_pb2_grpc.NodeServicer):
    """A node that answers with recorded 1.0 responses and keeps every request it got."""

    protocol_version: str = ""  # overrides the recorded one (a node of another major)
    executes: list[node_pb2.ExecuteRequest] = field(default_factory=list)

    def Describe(  # noqa: N802 - gRPC method name
        self, _request: node_pb2.DescribeRequest, _context: grpc.ServicerContext
    ) -> node_pb2.DescribeResponse:
        described = node_pb2.DescribeResponse.FromString((FIXTURE / "describe.binpb").read_bytes())
        if self.protocol_version:
            described.protocol_version = self.protocol_version
        return described

    def Explain(  # noqa: N802 - gRPC method name
        self, _request: node_pb2.ExecuteRequest, _context: grpc.ServicerContext
    ) -> node_pb2.ExplainResponse:
        return node_pb2.ExplainResponse.FromString((FIXTURE / "explain.binpb").read_bytes())

    def FitStep(  # noqa: N802 - gRPC method name
        self, _request: node_pb2.FitStepRequest, context: grpc.ServicerContext
    ) -> node_pb2.FitStepResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not recorded")

    def StreamLedger(  # noqa: N802 - gRPC method name
        self, _request: node_pb2.LedgerRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.LedgerEntry]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not recorded")

    def Execute(  # noqa: N802 - gRPC method name
        self, request: node_pb2.ExecuteRequest, _context: grpc.ServicerContext
    ) -> node_pb2.ExecuteResponse:
        self.executes.append(request)
        return node_pb2.ExecuteResponse.FromString((FIXTURE / "execute.binpb").read_bytes())


@dataclass
class Setup:
    """A running federation whose node gm is a replay, and the replay's record."""

    fed: LocalFederation
    replay: ReplayNode


@contextmanager
def _federation(root: Path, replay: ReplayNode) -> Iterator[Setup]:
    folders = synth.generate_federation(5_000, root / "data", seed=7)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], title=r.name) for r in synth.REGIONS
    )
    fed = LocalFederation(workdir=root, nodes=setups, deadline_ms=5_000)
    fed.create_pki()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    node_pb2_grpc.add_NodeServicer_to_server(replay, server)
    identity = load_identity(fed.identity_dir(Role.NODE, OLD))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(identity))
    server.start()
    # The hub dials the replay instead of the real gm (whose process runs unused).
    fed.hub_addresses[OLD] = f"127.0.0.1:{port}"
    try:
        with fed:
            yield Setup(fed, replay)
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Three nodes of this release and gm answering as a 1.0 node."""
    with _federation(tmp_path_factory.mktemp("versions"), ReplayNode()) as setup:
        yield setup


def test_the_fixture_is_a_node_of_protocol_1_0() -> None:
    described = node_pb2.DescribeResponse.FromString((FIXTURE / "describe.binpb").read_bytes())
    assert described.protocol_version == "chc.v1"
    assert described.node == OLD


def test_a_hub_lists_and_pools_a_node_of_the_previous_minor_version(mixed: Setup) -> None:
    with Federation(mixed.fed.hub_address, mixed.fed.analyst_identity) as fed:
        found, missing = fed.nodes()
        versions = {d.node: d.protocol_version for d in found}
        assert missing == []
        assert versions[OLD] == "chc.v1"
        assert {v for n, v in versions.items() if n != OLD} == {str(CURRENT)}
        query = from_json((FIXTURE / "query.json").read_bytes())
        result = fed.query(query)
    assert [n.status for n in result.nodes] == [NodeStatus.OK] * 4
    regions = set(result.table.column("region").to_pylist())
    assert regions == {"nenc", "nwc", "yh", OLD, POOLED}
    assert not result.partial


def test_a_node_of_1_0_is_never_sent_a_fetch_only_resend(mixed: Setup) -> None:
    with Federation(mixed.fed.hub_address, mixed.fed.analyst_identity) as fed:
        query = from_json((FIXTURE / "query.json").read_bytes())
        envelope = fed.sign(query)
        fed.run(envelope)
        before = len(mixed.replay.executes)
        again = fed.resend(envelope)
    by_node = {n.node: n for n in again.nodes}
    assert by_node[OLD].status is NodeStatus.REFUSED
    assert "chc.v1.1" in by_node[OLD].message
    assert "nothing was sent" in by_node[OLD].message
    others = [by_node[n] for n in by_node if n != OLD]
    assert all(n.status is NodeStatus.OK and n.resent for n in others)
    # The replay was asked nothing more: no kept_only it would have taken for a new query.
    assert len(mixed.replay.executes) == before
    assert not any(r.kept_only for r in mixed.replay.executes)


def test_a_node_refuses_a_caller_of_another_major_version_naming_both(mixed: Setup) -> None:
    hub = load_identity(mixed.fed.identity_dir(Role.HUB, "hub"))
    address = f"127.0.0.1:{mixed.fed.node_port('nwc')}"
    with grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(hub.ca_pem, hub.key_pem, hub.cert_pem),
        options=(("grpc.ssl_target_name_override", "nwc"),),
    ) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Describe(node_pb2.DescribeRequest(), timeout=10, metadata=((HEADER, "chc.v2.0"),))
        described = stub.Describe(
            node_pb2.DescribeRequest(), timeout=10, metadata=((HEADER, "chc.v1.0"),)
        )
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details() or ""
    assert "chc.v2.0" in message
    assert str(CURRENT) in message
    assert "node nwc" in message
    assert described.protocol_version == str(CURRENT)  # an older minor is served


def test_a_hub_leaves_out_a_node_of_another_major_version(tmp_path: Path) -> None:
    with (
        _federation(tmp_path, ReplayNode(protocol_version="chc.v2.0")) as setup,
        Federation(setup.fed.hub_address, setup.fed.analyst_identity) as fed,
    ):
        found, missing = fed.nodes()
    assert OLD not in {d.node for d in found}
    (left_out,) = missing
    assert left_out.node == OLD
    assert left_out.status is NodeStatus.REFUSED
    assert "chc.v2.0" in left_out.message
    assert str(CURRENT) in left_out.message


def test_every_chc_channel_says_its_version(mixed: Setup) -> None:
    """The header is sent by the channels chc makes (what the checks above rely on)."""
    seen: list[tuple[tuple[str, str | bytes], ...]] = []

    class Echo(node_pb2_grpc.NodeServicer):
        def Describe(  # noqa: N802 - gRPC method name
            self, _request: node_pb2.DescribeRequest, context: grpc.ServicerContext
        ) -> node_pb2.DescribeResponse:
            seen.append(tuple(context.invocation_metadata()))
            return node_pb2.DescribeResponse(node="echo", protocol_version=serde.PROTOCOL_VERSION)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # Only Describe is called; the stubs' other methods stay gRPC's UNIMPLEMENTED.
    node_pb2_grpc.add_NodeServicer_to_server(Echo(), server)  # type: ignore[abstract]
    identity = load_identity(mixed.fed.identity_dir(Role.NODE, "nwc"))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(identity))
    server.start()
    try:
        hub = load_identity(mixed.fed.identity_dir(Role.HUB, "hub"))
        with secure_channel(f"127.0.0.1:{port}", hub, server_name="nwc") as channel:
            node_pb2_grpc.NodeStub(channel).Describe(node_pb2.DescribeRequest(), timeout=10)
    finally:
        server.stop(None)
    (metadata,) = seen
    assert (HEADER, str(CURRENT)) in metadata
