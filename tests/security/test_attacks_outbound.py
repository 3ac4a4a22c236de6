"""The attack cases of tests/security, run against an outbound-only node (docs/outbound.md).

A real node process dials a hub run in this test: the hub's own link service
(coordinator/hub/links.py, with the federation's hub certificate), so the test plays the
hub, and a compromised one, exactly. Everything the hub sends reaches the node as link
frames; every guarantee of inbound mode must hold: replays are answered from the kept
release and charged once, an envelope signed to explain is never executed, a tampered
query is refused, and nothing moves the budget. The link itself is attacked too: parties
that are not nodes, or not this node, cannot link to the hub, and the node serves nothing
to a server that does not prove it is the hub.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from coordinator.hub.links import Links, NodeLinkService, stream_frames
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, HUB_NAME, LocalFederation, NodeSetup
from protocols import serde
from protocols.flower_process import free_port
from protocols.link_frames import sign, welcome_payload
from protocols.security.envelope import Audience, Operation, sign_query
from protocols.security.pki import Identity, Role, issue, load_identity
from protocols.security.tls import secure_channel, server_credentials
from protocols.v1 import link_pb2, link_pb2_grpc, node_pb2, node_pb2_grpc
from queries.spec import Query, canonical_bytes
from tests.security.conftest import ACCESS

pytestmark = pytest.mark.integration

NODE = "nwc"
OTHER_NODE = "gm"  # a node of the federation, also allowed to dial this hub
QUERY = Query(view="persons", rho=0.05, group_by=("sex",))


@dataclass
class _Hub:
    """The hub's link service on a port the node dials; stopped and replaced at will."""

    identity: Identity
    port: int
    links: Links = field(default_factory=lambda: Links(frozenset({NODE, OTHER_NODE})))
    server: grpc.Server | None = None

    def start(self, impostor: _Impostor | None = None) -> None:
        """Serve the hub's link service, or an impostor's with the impostor's certificate."""
        identity = self.identity if impostor is None else impostor.identity
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        link_pb2_grpc.add_NodeLinkServicer_to_server(
            impostor or NodeLinkService(self.links, identity), self.server
        )
        bound = self.server.add_secure_port(f"127.0.0.1:{self.port}", server_credentials(identity))
        assert bound == self.port
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None

    def stub(self) -> node_pb2_grpc.NodeStub:
        """The node's stub over its link, as the hub's registry makes it."""
        return node_pb2_grpc.NodeStub(self.links.channel(NODE))


@dataclass
class _Setting:
    fed: LocalFederation
    hub: _Hub

    def identity(self, role: Role, name: str) -> Identity:
        return load_identity(self.fed.identity_dir(role, name))

    def spent(self) -> float:
        return self.hub.stub().Describe(node_pb2.DescribeRequest(), timeout=10).budget.rho_spent

    def ledger(self) -> list[dict[str, object]]:
        """The node's ledger, read over the link for the federation's auditor."""
        auditor = self.identity(Role.AUDITOR, AUDITOR_NAME)
        entries = stream_frames(
            self.hub.links.require(NODE),
            "StreamLedger",
            node_pb2.LedgerRequest(from_sequence=1).SerializeToString(),
            10.0,
            node_pb2.LedgerEntry.FromString,
            on_behalf_of=auditor.cert_pem,
        )
        return [json.loads(e.body) for e in entries if not e.head]

    def envelope(
        self, query: Query = QUERY, operation: Operation = Operation.EXECUTE
    ) -> node_pb2.QueryEnvelope:
        analyst = self.identity(Role.ANALYST, "demo-analyst")
        signed = sign_query(
            analyst, canonical_bytes(query), operation=operation, audience=Audience(hub=HUB_NAME)
        )
        return serde.signed_query_to_proto(signed)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Setting]:
    root = tmp_path_factory.mktemp("outbound-attacks")
    folders = synth.generate_federation(2_000, root / "data", seed=5)
    node = NodeSetup(name=NODE, omop=folders[NODE], extra_toml=ACCESS, dial=True)
    fed = LocalFederation(workdir=root, nodes=(node,), deadline_ms=5_000)
    fed.create_pki()
    for role, name in (
        (Role.NODE, OTHER_NODE),
        (Role.NODE, "nenc"),
        (Role.ANALYST, HUB_NAME),  # an analyst certificate that carries the hub's name
        (Role.HUB, "evil-hub"),
    ):
        issue(fed.pki, role=role, name=name)
    fed.hub_port = free_port()
    hub = _Hub(load_identity(fed.identity_dir(Role.HUB, HUB_NAME)), fed.hub_port)
    hub.start()
    try:
        fed.start_node(node)
        assert hub.links.wait_linked(NODE, 60), (fed.workdir / "logs" / f"{NODE}.log").read_text()
        yield _Setting(fed, hub)
    finally:
        fed.stop()
        hub.stop()


@pytest.fixture
def unchanged_budget(setting: _Setting) -> Iterator[None]:
    before = setting.spent()
    yield
    assert setting.spent() == before


def _refused(stub: node_pb2_grpc.NodeStub, envelope: node_pb2.QueryEnvelope) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    return info.value


def test_a_replayed_envelope_reads_the_kept_release_charged_once(setting: _Setting) -> None:
    stub = setting.hub.stub()
    envelope = setting.envelope()
    first = stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    before = setting.spent()
    again = stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    assert again.resent
    assert not first.resent
    assert (again.table, again.query_id, again.ledger_sequence) == (
        first.table,
        first.query_id,
        first.ledger_sequence,
    )
    assert setting.spent() == before  # charged once, when first answered
    assert first.rho_charged > 0


@pytest.mark.usefixtures("unchanged_budget")
def test_the_hub_executing_an_explain_envelope_is_refused(setting: _Setting) -> None:
    stub = setting.hub.stub()
    envelope = setting.envelope(operation=Operation.EXPLAIN)
    assert stub.Explain(node_pb2.ExecuteRequest(envelope=envelope), timeout=10).rho > 0
    err = _refused(stub, envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not to execute it" in (err.details() or "")
    reasons = [str(e.get("reason", "")) for e in setting.ledger() if e.get("outcome") == "refused"]
    assert any("not to execute" in r for r in reasons), reasons


@pytest.mark.usefixtures("unchanged_budget")
def test_a_tampered_query_is_refused(setting: _Setting) -> None:
    envelope = setting.envelope()
    envelope.query = canonical_bytes(Query(view="persons", rho=0.9, group_by=("sex", "age_band")))
    err = _refused(setting.hub.stub(), envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not match" in (err.details() or "")
    refused = [e for e in setting.ledger() if e.get("code") == "UNAUTHENTICATED"]
    assert refused
    assert all(e.get("rho", 0) == 0 for e in refused)


@pytest.mark.usefixtures("unchanged_budget")
def test_the_hub_relays_ledgers_only_for_a_checked_auditor(setting: _Setting) -> None:
    session = setting.hub.links.require(NODE)
    request = node_pb2.LedgerRequest(from_sequence=1).SerializeToString()

    def status(method: str, body: bytes, on_behalf_of: bytes = b"") -> tuple[str, str]:
        pending = session.call(
            method, body, timeout_s=10, streaming=True, on_behalf_of=on_behalf_of
        )
        frame = pending.done.result(timeout=10)
        return _name(frame), frame.status.details

    # The hub itself reads no ledger, and cannot pass another role off as an auditor.
    code, details = status("StreamLedger", request)
    assert (code, "only auditors may read the ledger" in details) == ("PERMISSION_DENIED", True)
    analyst = setting.identity(Role.ANALYST, "demo-analyst")
    code, details = status("StreamLedger", request, analyst.cert_pem)
    assert code == "PERMISSION_DENIED"
    assert "role analyst, not auditor" in details
    # A genuine auditor's certificate lends the hub nothing but ledger reads.
    auditor = setting.identity(Role.AUDITOR, AUDITOR_NAME)
    execute = node_pb2.ExecuteRequest(envelope=setting.envelope()).SerializeToString()
    code, details = status("Execute", execute, auditor.cert_pem)
    assert code == "PERMISSION_DENIED"
    assert "only ledger reads" in details
    assert setting.ledger()  # while the auditor's own read works


def _name(frame: link_pb2.NodeFrame) -> str:
    return next(c.name for c in grpc.StatusCode if c.value[0] == frame.status.code)


def _connect(setting: _Setting, identity: Identity, hello_name: str) -> grpc.RpcError:
    """Open a link to the hub as identity, naming hello_name; the hub's refusal."""
    channel = secure_channel(f"127.0.0.1:{setting.hub.port}", identity, server_name=HUB_NAME)
    hello = link_pb2.NodeFrame(
        hello=link_pb2.LinkHello(
            node=hello_name, protocol_version=serde.PROTOCOL_VERSION, challenge=b"c" * 32
        )
    )
    stream = link_pb2_grpc.NodeLinkStub(channel).Connect(iter([hello]), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stream))
    channel.close()
    return info.value


def test_only_a_configured_node_links_under_its_own_name(setting: _Setting) -> None:
    session = setting.hub.links.session(NODE)
    assert session is not None
    for role, name in ((Role.ANALYST, "demo-analyst"), (Role.AUDITOR, AUDITOR_NAME)):
        err = _connect(setting, setting.identity(role, name), NODE)
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert f"has role {role.value}; only nodes may link" in (err.details() or "")
    err = _connect(setting, setting.identity(Role.NODE, OTHER_NODE), NODE)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert f"names node '{NODE}' but its certificate is issued to '{OTHER_NODE}'" in (
        err.details() or ""
    )
    err = _connect(setting, setting.identity(Role.NODE, "nenc"), "nenc")
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert 'address = "dial"' in (err.details() or "")
    # The real node's link was never replaced by any of them.
    assert setting.hub.links.session(NODE) is session


def test_a_link_that_never_says_hello_is_dropped(setting: _Setting) -> None:
    """An authenticated node that opens links and says nothing holds no hub thread for long."""
    channel = secure_channel(
        f"127.0.0.1:{setting.hub.port}",
        setting.identity(Role.NODE, OTHER_NODE),
        server_name=HUB_NAME,
    )

    def silent() -> Iterator[link_pb2.NodeFrame]:
        time.sleep(8.0)
        yield from ()

    began = time.monotonic()
    stream = link_pb2_grpc.NodeLinkStub(channel).Connect(silent(), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stream))
    channel.close()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "starts with a LinkHello" in (info.value.details() or "")
    assert time.monotonic() - began < 7.0  # dropped after SILENT_AFTER_S, not when it gave up


class _Impostor(link_pb2_grpc.NodeLinkServicer):
    """A server the node may dial that is not the hub: it welcomes the node with the
    certificate it has and asks for a Describe, recording whatever comes back."""

    def __init__(self, identity: Identity, *, signs_for: str | None = None) -> None:
        self.identity = identity
        self.signs_for = signs_for  # a node name other than the caller's: a relayed welcome
        self.hellos: list[str] = []
        self.answers: list[link_pb2.NodeFrame] = []

    def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[link_pb2.NodeFrame], context: grpc.ServicerContext
    ) -> Iterator[link_pb2.HubFrame]:
        del context
        first = next(request_iterator, None)
        if first is None:
            return
        self.hellos.append(first.hello.node)
        node = self.signs_for or first.hello.node
        yield link_pb2.HubFrame(
            welcome=link_pb2.LinkWelcome(
                hub_certificate=self.identity.cert_pem,
                signature=sign(
                    self.identity, welcome_payload(HUB_NAME, node, first.hello.challenge)
                ),
                protocol_version=serde.PROTOCOL_VERSION,
            )
        )
        yield link_pb2.HubFrame(
            call_id=1,
            method="Describe",
            request=node_pb2.DescribeRequest().SerializeToString(),
            deadline_ms=5_000,
        )
        for frame in request_iterator:
            if frame.call_id:
                self.answers.append(frame)


def _log(setting: _Setting) -> str:
    return (setting.fed.workdir / "logs" / f"{NODE}.log").read_text(errors="replace")


def _dialled_by_node(setting: _Setting, impostor: _Impostor, wait_s: float) -> None:
    setting.hub.stop()
    setting.hub.start(impostor)
    time.sleep(wait_s)
    setting.hub.stop()


def test_the_node_serves_nothing_to_a_server_that_is_not_the_hub(setting: _Setting) -> None:
    evil_hub = setting.identity(Role.HUB, "evil-hub")
    named_hub = setting.identity(Role.ANALYST, HUB_NAME)
    real_hub = setting.hub.identity
    try:
        # A hub certificate of another name: TLS refuses it before the node says a word.
        wrong_name = _Impostor(evil_hub)
        _dialled_by_node(setting, wrong_name, 4.0)
        assert wrong_name.hellos == []
        assert wrong_name.answers == []
        # The hub's name on an analyst's certificate passes TLS, but not the role check.
        wrong_role = _Impostor(named_hub)
        _dialled_by_node(setting, wrong_role, 5.0)
        assert wrong_role.hellos, "the node never dialled the impostor"
        assert wrong_role.answers == []
        assert "has role analyst, not hub" in _log(setting)
        # The genuine hub key, but a welcome signed for another node (as a hub would sign
        # on that node's link): bound to its node and challenge, it does not verify here.
        relayed = _Impostor(real_hub, signs_for=OTHER_NODE)
        _dialled_by_node(setting, relayed, 5.0)
        assert relayed.hellos
        assert relayed.answers == []
        assert "the hub's welcome: the signature of hub does not verify" in _log(setting)
    finally:
        setting.hub.start()
    # The node was dialling all along, and links to the real hub again.
    assert setting.hub.links.wait_linked(NODE, 15), _log(setting)[-2000:]


def test_the_link_to_the_real_hub_serves_after_the_impostors(setting: _Setting) -> None:
    assert setting.hub.links.wait_linked(NODE, 15)
    reply = setting.hub.stub().Describe(node_pb2.DescribeRequest(), timeout=10)
    assert reply.node == NODE
