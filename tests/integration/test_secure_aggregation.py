"""Secure aggregation through the real path (docs/secure-aggregation.md).

Real node and hub processes on loopback with mutual TLS, two nodes dialling the hub and two
listening: a pooled_only query runs in two rounds, the hub releases only the pooled rows,
every node charges its ledger before sending its masked share and records the guarantee,
the pooled interval is central DP's width (not per-node noise's sqrt(k) wider), and what
the hub cannot finish is refused cleanly with every ledger consistent.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.analyst.client import Federation
from coordinator.cli import app
from coordinator.local import synth
from coordinator.local.federation import (
    AUDITOR_NAME,
    HUB_NAME,
    LocalFederation,
    NodeSetup,
)
from protocols import revocation, serde
from protocols.revocation import CRL_FILE
from protocols.secagg import masks
from protocols.security.envelope import Audience, sign_query
from protocols.security.pki import CA_FILE, CA_KEY_FILE, ISSUED_FILE, Role, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries import combine
from queries.errors import ChcError
from queries.results import NodeStatus
from queries.spec import Query, canonical_bytes

pytestmark = pytest.mark.integration

OUTBOUND = ("nwc", "gm")  # these dial the hub; the other two listen
INBOUND = tuple(r.slug for r in synth.REGIONS if r.slug not in OUTBOUND)
COUNT = Query(view="persons", rho=0.02, group_by=("sex",))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("secagg")
    folders = synth.generate_federation(4_000, root / "data", seed=19)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], title=r.name, dial=r.slug in OUTBOUND)
        for r in synth.REGIONS
    )
    with LocalFederation(workdir=root, nodes=setups, deadline_ms=10_000) as federation:
        for name in OUTBOUND:
            assert _linked(federation, name)
        yield federation


def _linked(fed: LocalFederation, node: str) -> bool:
    """Wait until an outbound node answers through the hub."""
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        for _ in range(100):
            described, _ = client.nodes(timeout_s=5)
            if node in {d.node for d in described}:
                return True
    return False


def _stub(
    fed: LocalFederation, node: str, role: Role
) -> tuple[grpc.Channel, node_pb2_grpc.NodeStub]:
    name = {Role.HUB: HUB_NAME, Role.AUDITOR: AUDITOR_NAME}.get(role)
    folder = fed.analyst_identity if role is Role.ANALYST else fed.identity_dir(role, str(name))
    channel = secure_channel(
        f"127.0.0.1:{fed.node_port(node)}", load_identity(folder), server_name=node
    )
    return channel, node_pb2_grpc.NodeStub(channel)


def _entries(fed: LocalFederation, node: str) -> dict[int, dict[str, object]]:
    """A node's ledger entries by sequence, read from its file (outbound nodes too)."""
    import sqlite3

    with sqlite3.connect(f"file:{fed.ledger_path(node)}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT sequence, body FROM entries ORDER BY sequence").fetchall()
    return {int(s): json.loads(b) for s, b in rows}


def _envelope(fed: LocalFederation, query: Query, nodes: tuple[str, ...]) -> node_pb2.QueryEnvelope:
    analyst = load_identity(fed.analyst_identity)
    signed = sign_query(
        analyst, canonical_bytes(query), audience=Audience(hub=HUB_NAME, nodes=nodes)
    )
    return serde.signed_query_to_proto(signed)


def test_a_pooled_only_query_releases_the_pooled_rows_only(fed: LocalFederation) -> None:
    names = tuple(sorted(r.slug for r in synth.REGIONS))
    before = {n: len(_entries(fed, n)) for n in names}
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        result = client.run(_envelope(fed, _pooled(COUNT), names))
    sa = result.secure_aggregation
    assert sa is not None
    assert (sa.nodes, sa.threshold) == (4, 4)
    assert sa.round == names
    assert sa.rho_threshold <= COUNT.rho * (1 + 1e-9)
    assert set(result.table.column("region").to_pylist()) == {combine.POOLED}
    assert sorted(result.table.column("sex").to_pylist()) == ["female", "male", "unknown"]
    assert all(o.status is NodeStatus.OK for o in result.nodes)
    for o in result.nodes:
        assert o.rho_charged == pytest.approx(COUNT.rho)
        # Charged in its own ledger, before it sent, with the guarantee recorded.
        entry = _entries(fed, o.node)[o.ledger_sequence]
        assert len(_entries(fed, o.node)) == before[o.node] + 1
        record = entry["secure_aggregation"]
        assert isinstance(record, dict)
        assert (record["nodes"], record["threshold"]) == (4, 4)
        assert record["round"] == list(names)
        assert entry["rho"] == pytest.approx(COUNT.rho)
    # A pooled count of 4,000 persons split by sex: the noisy sum is near the truth.
    estimates = [e for e in result.table.column("estimate").to_pylist() if e is not None]
    assert 3_000 < sum(estimates) < 5_000


def _pooled(query: Query, honest: int | None = None) -> Query:
    import dataclasses

    return dataclasses.replace(query, pooled_only=True, honest_nodes=honest)


def test_the_pooled_interval_is_central_dp_wide_not_per_node_wide(fed: LocalFederation) -> None:
    """The stated standard error with secure aggregation is within 10% of a single trusted
    curator's (the query's sigma once), and about sqrt(k) narrower than per-node noise's."""
    names = tuple(sorted(r.slug for r in synth.REGIONS))
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        ordinary = client.query(COUNT)
        secure = client.run(_envelope(fed, _pooled(COUNT), names))
    pooled = ordinary.table.filter(pc.equal(ordinary.table.column("region"), combine.POOLED))
    # Compare the large cells only (about 2,000 persons of each sex, some 500 per node): whether
    # the few persons of unknown sex are suppressed, at a node or pooled, depends on the noise,
    # and a pooled cell that some nodes suppressed carries fewer nodes' noise.
    large = ["female", "male"]
    per_node_se = _std_errors(pooled, large)
    secure_se = _std_errors(secure.table, large)
    # Central DP: one discrete Gaussian of the query's scale (sensitivity 1 for a count).
    central_se = 1.0 / math.sqrt(2 * COUNT.rho)
    assert np.all(np.abs(secure_se / central_se - 1) < 0.10), (secure_se, central_se)
    assert np.all(np.abs(per_node_se / secure_se / math.sqrt(4) - 1) < 0.15)


def _std_errors(table: pa.Table, sexes: list[str]) -> np.ndarray:
    """The stated standard error of each named cell, in that order (each must state one)."""
    sexes_seen = table.column("sex").to_pylist()
    by_sex = dict(zip(sexes_seen, table.column("std_error").to_pylist(), strict=True))
    assert all(by_sex.get(s) for s in sexes), by_sex
    return np.asarray([by_sex[s] for s in sexes], dtype=float)


def test_execute_refuses_a_pooled_only_envelope_at_no_cost(fed: LocalFederation) -> None:
    node = INBOUND[0]
    before = len(_entries(fed, node))
    envelope = _envelope(fed, _pooled(COUNT), tuple(sorted(r.slug for r in synth.REGIONS)))
    for role in (Role.HUB, Role.ANALYST):
        channel, stub = _stub(fed, node, role)
        with pytest.raises(grpc.RpcError) as info:
            stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=30)
        channel.close()
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "pooled_only" in (info.value.details() or "")
    released = [
        e for e in list(_entries(fed, node).values())[before:] if e["outcome"] == "released"
    ]
    assert released == []


def test_an_envelope_that_names_no_nodes_is_refused_before_any_round(fed: LocalFederation) -> None:
    with (
        Federation(fed.hub_address, fed.analyst_identity) as client,
        pytest.raises(ChcError) as info,
    ):
        client.run(_envelope(fed, _pooled(COUNT), ()))
    assert "node" in str(info.value)


def test_a_node_announces_and_masks_at_most_once(fed: LocalFederation) -> None:
    node = INBOUND[0]
    envelope = _envelope(fed, _pooled(COUNT), INBOUND)
    channel, stub = _stub(fed, node, Role.HUB)
    request = node_pb2.SecAggRequest(envelope=envelope)
    stub.SecAggAnnounce(request, timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        stub.SecAggAnnounce(request, timeout=30)
    channel.close()
    assert "already announced" in (info.value.details() or "")


def test_a_dropout_after_masking_is_refused_and_every_ledger_stays_consistent(
    fed: LocalFederation,
) -> None:
    """Acting as the hub (its certificate): both inbound nodes mask and charge, one vector
    is lost; the sum of the rest is refused, each node's ledger holds exactly its one charge,
    and a re-run without the lost node is a new round charged again."""
    envelope = _envelope(fed, _pooled(COUNT), INBOUND)
    before = {n: len(_entries(fed, n)) for n in INBOUND}
    stubs = {n: _stub(fed, n, Role.HUB) for n in INBOUND}
    request = node_pb2.SecAggRequest(envelope=envelope)
    announced = [stubs[n][1].SecAggAnnounce(request, timeout=30) for n in INBOUND]
    request.announcements.extend(announced)
    shares = {n: stubs[n][1].SecAggShare(request, timeout=30) for n in INBOUND}
    for channel, _ in stubs.values():
        channel.close()
    kept = [shares[INBOUND[0]]]  # INBOUND[1]'s vector is lost on its way to the hub
    with pytest.raises(ValueError, match="missing"):
        # The hub's summation refuses a round whose vectors are not all there.
        _sum_of(kept, expected=len(INBOUND))
    for n in INBOUND:
        entries = list(_entries(fed, n).values())[before[n] :]
        released = [e for e in entries if e["outcome"] == "released"]
        assert len(released) == 1
        assert released[0]["query_id"] == shares[n].query_id
        assert released[0]["rho"] == pytest.approx(shares[n].rho_charged)
        recorded = node_pb2.QueryEnvelope.FromString(base64.b64decode(str(released[0]["envelope"])))
        assert recorded == envelope
    # The audit chain still verifies at each node (nothing half-written).
    from coordinator.audit.sources import open_file
    from coordinator.audit.verification import verify

    for n in INBOUND:
        assert verify(open_file(fed.ledger_path(n))).ok


def _sum_of(shares: list[node_pb2.SecAggShareResponse], *, expected: int) -> list[int]:
    if len(shares) != expected:
        raise ValueError(f"{expected - len(shares)} masked vector(s) missing")
    return masks.unmask_sum([np.frombuffer(s.masked, dtype="<u8") for s in shares])


def test_a_node_down_in_round_one_aborts_with_nothing_charged(fed: LocalFederation) -> None:
    names = tuple(sorted(r.slug for r in synth.REGIONS))
    envelope = _envelope(fed, _pooled(COUNT), names)
    down = INBOUND[1]
    before = {n: len(_entries(fed, n)) for n in names}
    fed.stop_process(down)
    try:
        with (
            Federation(fed.hub_address, fed.analyst_identity) as client,
            pytest.raises(ChcError) as info,
        ):
            client.run(envelope, deadline_s=8)
    finally:
        fed.restart_node(down)
    message = str(info.value)
    assert "round 1" in message
    assert down in message
    assert "Nothing was charged" in message
    for n in names:
        if n == down:
            continue
        new = list(_entries(fed, n).values())[before[n] :]
        assert [e for e in new if e["outcome"] == "released"] == []


def _as_hub_round_one(
    fed: LocalFederation, envelope: node_pb2.QueryEnvelope
) -> tuple[dict[str, node_pb2_grpc.NodeStub], list[grpc.Channel], node_pb2.SecAggRequest]:
    stubs, channels = {}, []
    for n in INBOUND:
        channel, stubs[n] = _stub(fed, n, Role.HUB)
        channels.append(channel)
    request = node_pb2.SecAggRequest(envelope=envelope)
    request.announcements.extend(stubs[n].SecAggAnnounce(request, timeout=30) for n in INBOUND)
    return stubs, channels, request


def test_a_hub_cannot_leave_a_node_out_or_substitute_its_key(fed: LocalFederation) -> None:
    """Each node checks the round itself: every node the envelope names, each key signed by
    its own node. A deviating hub is refused, and nothing is charged."""
    before = {n: len(_entries(fed, n)) for n in INBOUND}
    # Left out: the other node's announcement is missing from round 2.
    stubs, channels, request = _as_hub_round_one(fed, _envelope(fed, _pooled(COUNT), INBOUND))
    alone = node_pb2.SecAggRequest(envelope=request.envelope)
    alone.announcements.append(request.announcements[0])
    with pytest.raises(grpc.RpcError) as left_out:
        stubs[INBOUND[0]].SecAggShare(alone, timeout=30)
    assert "missing" in (left_out.value.details() or "")
    # Substituted: the hub's own key in place of the other node's.
    forged = node_pb2.SecAggRequest()
    forged.CopyFrom(request)
    forged.announcements[1].public_key = bytes(32)
    with pytest.raises(grpc.RpcError) as substituted:
        stubs[INBOUND[0]].SecAggShare(forged, timeout=30)
    for channel in channels:
        channel.close()
    assert substituted.value.code() is grpc.StatusCode.UNAUTHENTICATED
    for n in INBOUND:
        new = list(_entries(fed, n).values())[before[n] :]
        assert [e for e in new if e["outcome"] == "released"] == []


@pytest.fixture
def split_crl(tmp_path: Path) -> Iterator[tuple[LocalFederation, str, str]]:
    """A federation where one node (strict) holds a CRL of its own that revokes another
    node's certificate: it passes round 1 and refuses round 2, after the others masked."""
    folders = synth.generate_federation(2_000, tmp_path / "data", seed=23)
    slugs = sorted(r.slug for r in synth.REGIONS)
    revoked, strict = slugs[0], slugs[-1]
    own = tmp_path / "strict-pki"
    setups = tuple(
        NodeSetup(
            name=r.slug,
            omop=folders[r.slug],
            title=r.name,
            crl=own / CRL_FILE if r.slug == strict else None,
        )
        for r in synth.REGIONS
    )
    federation = LocalFederation(workdir=tmp_path, nodes=setups, deadline_ms=10_000)
    federation.create_pki()
    own.mkdir()
    for name in (CA_FILE, CA_KEY_FILE, ISSUED_FILE):
        shutil.copy(federation.pki / name, own / name)
    revocation.revoke(own, revoked, reason="key compromise, as this node was told")
    with federation:
        yield federation, revoked, strict


def test_a_node_failing_after_the_others_masked_aborts_and_ledgers_stay_consistent(
    split_crl: tuple[LocalFederation, str, str],
) -> None:
    """Through the real hub: the strict node refuses round 2, the other three have charged
    and masked; nothing is released, the analyst is told each charge, every ledger holds
    exactly what its node did, and a re-run without the strict node succeeds."""
    fed, revoked, strict = split_crl
    names = tuple(sorted(r.slug for r in synth.REGIONS))
    before = {n: len(_entries(fed, n)) for n in names}
    client = Federation(fed.hub_address, fed.analyst_identity)
    with client, pytest.raises(ChcError) as info:
        client.run(_envelope(fed, _pooled(COUNT), names))
    message = str(info.value)
    assert "round 2" in message
    assert f"{strict} refused" in message
    assert "revoked" in message
    assert "nothing was released" in message
    others = [n for n in names if n != strict]
    for n in names:
        new = list(_entries(fed, n).values())[before[n] :]
        released = [e for e in new if e["outcome"] == "released"]
        if n == strict:
            assert released == []
            assert [e["outcome"] for e in new] == ["refused"]
        else:
            assert len(released) == 1
            assert "secure_aggregation" in released[0]
            # The analyst was told this very charge, with its ledger entry.
            assert f"{n} rho 0.02 (ledger #{before[n] + 1})" in message
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        again = client.run(_envelope(fed, _pooled(COUNT), tuple(others)))
    assert again.secure_aggregation is not None
    assert again.secure_aggregation.round == tuple(others)
    assert revoked in again.secure_aggregation.round  # only the strict node distrusts it


def _chc(fed: LocalFederation, *args: str) -> Result:
    hub = ["--hub", fed.hub_address, "--identity", str(fed.analyst_identity)]
    return CliRunner().invoke(app, [*args, *hub])


def test_chc_query_pooled_only_end_to_end(fed: LocalFederation) -> None:
    """`chc query --pooled-only`: the pooled rows, the guarantee, each node's receipt."""
    run = _chc(fed, "query", "--view", "persons", "--rho", "0.02", "--pooled-only", "--json")
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    secure = payload["secure_aggregation"]
    assert secure["nodes"] == 4
    assert secure["threshold"] == 4
    assert {row["region"] for row in payload["rows"]} == {combine.POOLED}
    text = _chc(
        fed, "query", "--view", "persons", "--rho", "0.02", "--pooled-only", "--honest-nodes", "3"
    )
    assert text.exit_code == 0, text.output
    assert "Secure aggregation over 4 nodes (shares assume 3 honest)" in " ".join(
        text.stdout.split()
    )


def test_explain_shows_both_noises_and_spends_nothing(fed: LocalFederation) -> None:
    """Explain of a pooled_only query: each node's own noise and the secure aggregate's, the
    latter about sqrt(k) narrower pooled; no ledger entry anywhere."""
    names = tuple(sorted(r.slug for r in synth.REGIONS))
    before = {n: len(_entries(fed, n)) for n in names}
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        explanation = client.explain(_pooled(COUNT))
    assert {e.node for e in explanation} == set(names)
    for e in explanation:
        assert e.status is NodeStatus.OK, e.message
        assert e.secure_aggregation is not None
        assert e.secure_aggregation.round == names
        per_node = {m.measure: m.noise.variance for m in e.measures}
        secure = {m.measure: m.noise.variance for m in e.secure_measures}
        assert secure.keys() == per_node.keys()
        for key, variance in secure.items():
            # The whole secure aggregate carries about one node's full noise (t = k), where
            # pooling per-node releases adds k of them: sqrt(k) wider.
            assert 0.9 < per_node[key] / variance < 1.1
    assert {n: len(_entries(fed, n)) for n in names} == before
