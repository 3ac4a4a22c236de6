"""Attacks by hostile input: oversized messages, injection, path traversal, bounded work.

Each attack asserts the refusal (status code and a message that says what to fix) and that
no node's budget moved. Threat model: docs/threat-model.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from coordinator.analyst.client import Federation
from coordinator.local.federation import AUDITOR_NAME, LocalFederation
from protocols import serde
from protocols.security.pki import Role, create_ca, issue
from protocols.security.tls import MAX_MESSAGE_BYTES
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.errors import ConfigError, QueryError
from queries.spec import Filter, Query
from queries.sql import parse_sql
from tests.security._attack_helpers import NODE, _analyst, _execute, _identity, _node_stub, _signed

pytestmark = pytest.mark.integration


@pytest.mark.usefixtures("unchanged_budget")
def test_oversized_message(fed: LocalFederation) -> None:
    ident = _analyst(fed)
    creds = grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.cert_pem)
    channel = grpc.secure_channel(
        f"127.0.0.1:{fed.node_port(NODE)}",
        creds,
        options=(
            ("grpc.ssl_target_name_override", NODE),
            ("grpc.max_send_message_length", 80 * 1024 * 1024),
        ),
    )
    envelope = serde.signed_query_to_proto(_signed(fed))
    envelope.analyst_certificate = b"x" * (MAX_MESSAGE_BYTES + 1024)
    err = _execute(node_pb2_grpc.NodeStub(channel), envelope)
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()


@pytest.mark.usefixtures("unchanged_budget")
@pytest.mark.parametrize(
    "attack",
    [
        "SELECT sex, COUNT(*) FROM persons WHERE sex = 'x'' OR ''1''=''1' GROUP BY sex",
        "SELECT COUNT(*) FROM persons WHERE sex IN ('female'); DROP TABLE persons; --')",
        'SELECT COUNT(*) FROM "persons; DROP TABLE persons"',
        "SELECT COUNT(*) FROM read_parquet('/etc/passwd')",
        'SELECT COUNT(*) FROM persons GROUP BY "sex""; --"',
    ],
)
def test_sql_injection_is_refused(fed: LocalFederation, attack: str) -> None:
    with Federation(fed.hub_address, _analyst(fed)) as client, pytest.raises(QueryError):
        client.query(parse_sql(attack, rho=0.05))


@pytest.mark.usefixtures("unchanged_budget")
def test_injection_in_a_spec_filter_value_is_refused_by_the_node(fed: LocalFederation) -> None:
    query = Query(view="persons", rho=0.05, where=(Filter("sex", ("female' OR '1'='1",)),))
    with (
        Federation(fed.hub_address, _analyst(fed)) as client,
        pytest.raises(QueryError, match="not in its public domain"),
    ):
        client.query(query)


def test_path_traversal_in_names_and_config(tmp_path: Path) -> None:
    create_ca(tmp_path / "pki")
    for bad in ("../../etc/x", "a/b", ".hidden", "x" * 65, ""):
        with pytest.raises(ConfigError):
            issue(tmp_path / "pki", role=Role.ANALYST, name=bad)
    from queries.pathway import parse_pathway

    with pytest.raises(ConfigError, match=r"pathway name|not a valid name"):
        parse_pathway("name: ../../etc\nconditions: [1]\n", "evil.yaml")


# ---- bounded work (docs/threat-model.md, "Bounded work") ------------------------------------


def _ledger_bodies(fed: LocalFederation) -> list[dict[str, object]]:
    stub = _node_stub(fed, _identity(fed, Role.AUDITOR, AUDITOR_NAME))
    stream = stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=30)
    return [json.loads(e.body) for e in stream if not e.head]


def _ledger_bytes(fed: LocalFederation) -> int:
    folder = fed.workdir / "conf"
    return sum(p.stat().st_size for p in folder.glob(f"{NODE}.ledger.sqlite*"))


@pytest.mark.usefixtures("unchanged_budget")
def test_a_5_mb_junk_envelope_from_an_auditor_costs_the_ledger_a_few_kb(
    fed: LocalFederation,
) -> None:
    auditor = _identity(fed, Role.AUDITOR, AUDITOR_NAME)
    junk = node_pb2.QueryEnvelope(
        query=b'{"view": "' + b"x" * (3 * 1024 * 1024) + b'"}',
        analyst="j" * 100_000,
        analyst_certificate=b"\x00" * (2 * 1024 * 1024),
    )
    assert junk.ByteSize() > 5 * 1024 * 1024
    before = _ledger_bytes(fed)
    err = _execute(_node_stub(fed, auditor), junk)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(err.details() or "") < 2000
    grown = _ledger_bytes(fed) - before
    assert grown < 64 * 1024, f"the ledger grew by {grown} bytes"  # it was 12 MB
    body = _ledger_bodies(fed)[-1]
    assert body["code"] == "PERMISSION_DENIED"
    assert "envelope" not in body
    assert body["envelope_size"] == junk.ByteSize()
    assert body["query_truncated"] is True
    assert len(json.dumps(body)) < 8 * 1024


def test_repeated_refusals_are_rate_limited_and_recorded_once(fed: LocalFederation) -> None:
    """A peer refused again and again: 30 refusals recorded, then one entry saying rate
    limiting started, then answers (same code, saying so) that the ledger does not grow by."""
    from node.config import REFUSALS_PER_WINDOW

    name = "flooder"
    issue(fed.pki, role=Role.ANALYST, name=name)
    stub = _node_stub(fed, _analyst(fed, name))
    junk = node_pb2.QueryEnvelope(query=b"{}", analyst=name, nonce=b"n" * 16)
    details = []
    for _ in range(REFUSALS_PER_WINDOW + 10):
        err = _execute(stub, junk)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        details.append(err.details() or "")
    assert not any("rate-limiting" in d for d in details[:REFUSALS_PER_WINDOW])
    assert f"now rate-limiting refusals from {name}" in details[REFUSALS_PER_WINDOW]
    assert all("not recorded in its ledger" in d for d in details[REFUSALS_PER_WINDOW + 1 :])
    mine = [b for b in _ledger_bodies(fed) if b.get("analyst") == name]
    assert len(mine) == REFUSALS_PER_WINDOW + 1
    limited = [b["rate_limited"] for b in mine if "rate_limited" in b]
    assert len(limited) == 1
    assert limited[0]["peer"] == name  # type: ignore[index]
    assert limited[0]["refusals"] == REFUSALS_PER_WINDOW  # type: ignore[index]
    assert mine[-1]["reason"] == details[REFUSALS_PER_WINDOW]
    # Others are still recorded.
    expired = serde.signed_query_to_proto(_signed(fed, ttl_ms=1))
    time.sleep(0.05)
    before = len(_ledger_bodies(fed))
    assert "rate-limiting" not in (
        _execute(_node_stub(fed, _analyst(fed)), expired).details() or ""
    )
    assert len(_ledger_bodies(fed)) == before + 1


def _run_node(command: str, config: Path, *extra: str) -> tuple[int, str]:
    import subprocess
    import sys

    run = subprocess.run(  # our own interpreter and module
        [sys.executable, "-m", "node", command, "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../../evil", "is not a valid node name"),
        ("/tmp/chc-evil", "is not a valid node name"),  # noqa: S108 - never written
        ("york", "name 'york' does not match the node's certificate, which is issued to 'nwc'"),
    ],
)
def test_a_node_misnamed_or_not_named_as_its_certificate_does_not_start(
    fed: LocalFederation, tmp_path: Path, name: str, words: str
) -> None:
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    config = folder / "node.toml"
    identity = fed.identity_dir(Role.NODE, NODE).resolve()
    config.write_text(
        f'name = "{name}"\nomop = "{fed.nodes[1].omop.resolve()}"\nidentity = "{identity}"\n'
        'listen = "127.0.0.1:0"\n'
    )
    code, output = _run_node("check", config)
    assert code != 0
    assert words in output
    assert "is ready" not in output
    ready = tmp_path / "ready.json"
    code, output = _run_node("serve", config, "--ready-file", str(ready))
    assert code != 0
    assert words in output
    assert not ready.exists()
    # No ledger anywhere: not in the folder, not two folders up, not at an absolute path.
    assert not list(tmp_path.rglob("*.sqlite*"))
    assert not Path("/tmp/chc-evil.ledger.sqlite").exists()  # noqa: S108
