"""Refusals are recorded as bounded digests (node.budget.book.LedgerBook.refusal_entry), verified by
coordinator.audit alongside older refusal entries that keep the whole envelope, and rate
limited per peer (node.guards.RefusalLimiter)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coordinator.audit.sources import LedgerSource, open_file
from coordinator.audit.verification import verify
from node.budget.accounting import MemoryAccountant, RateLimited, Refusal
from node.budget.book import REFUSAL_ENVELOPE_BYTES, REFUSAL_QUERY_BYTES
from node.budget.ledger import SqliteLedger
from node.guards import RefusalLimiter
from protocols import serde
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import REFUSED, canonical_json, query_text
from protocols.security.envelope import sign_query
from protocols.v1 import node_pb2
from queries.spec import Query, canonical_bytes
from tests.unit._accounting_helpers import Pki, make_pki, signed_charge, source_of

POLICY = BudgetPolicy(total_rho=10.0, max_rho_per_query=1.0)
JUNK = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def junk_refusal(size: int = JUNK) -> Refusal:
    """What an auditor's junk envelope becomes: megabytes of query and certificate."""
    query = b'{"view": "' + b"x" * size + b'"}'
    envelope = node_pb2.QueryEnvelope(
        query=query, analyst="a" * size, analyst_certificate=b"\x00" * size
    ).SerializeToString(deterministic=True)
    return Refusal(
        analyst="a" * size,
        query=query,
        envelope=envelope,
        reason="demo-auditor has role auditor; only analysts may run queries " + "r" * size,
        code="PERMISSION_DENIED",
    )


def last_body(accountant: MemoryAccountant) -> dict[str, object]:
    *_, entry = accountant.entries()
    body: dict[str, object] = json.loads(entry.body)
    return body


def test_a_huge_refusal_is_a_few_kb_and_verifies(pki: Pki) -> None:
    a = MemoryAccountant(POLICY, node="nwc")
    refusal = junk_refusal()
    a.refuse(refusal)
    *_, entry = a.entries()
    assert len(entry.body) < 8 * 1024
    body = json.loads(entry.body)
    assert "envelope" not in body
    assert body["outcome"] == REFUSED
    assert body["query_size"] == len(refusal.query)
    assert body["query_truncated"] is True
    assert body["query"] == query_text(refusal.query[:REFUSAL_QUERY_BYTES])
    assert body["query_sha256"] == hashlib.sha256(refusal.query).hexdigest()
    assert body["envelope_size"] == len(refusal.envelope)
    assert body["envelope_sha256"] == hashlib.sha256(refusal.envelope).hexdigest()
    prefix = base64.b64decode(body["envelope_prefix"])
    assert prefix == refusal.envelope[:REFUSAL_ENVELOPE_BYTES]
    assert len(body["analyst"]) <= 128
    assert len(body["reason"]) <= 1000
    assert body["reason"].startswith("demo-auditor has role auditor")
    assert body["views"] == []  # the view it names is not a valid name
    result = verify(source_of(a), ca_pem=pki.ca_pem)
    assert result.ok, [str(x) for x in result.anomalies]
    assert result.refused == 1


def test_a_small_refusal_keeps_its_query_whole(pki: Pki) -> None:
    a = MemoryAccountant(POLICY, node="nwc")
    signed = sign_query(pki.alice, canonical_bytes(Query("copd", 0.1)))
    envelope = serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)
    a.refuse(Refusal("alice", signed.query, envelope, "no such view", "INVALID_ARGUMENT"))
    body = last_body(a)
    assert body["query"] == signed.query.decode()
    assert body["query_truncated"] is False
    assert body["views"] == ["copd"]
    assert body["analyst"] == "alice"
    # The envelope (certificate included) is larger than the prefix kept.
    assert body["envelope_size"] == len(envelope) > REFUSAL_ENVELOPE_BYTES
    assert verify(source_of(a), ca_pem=pki.ca_pem).ok


def test_the_ledger_file_grows_by_a_few_kb_per_huge_refusal(tmp_path: Path) -> None:
    path = tmp_path / "nwc.ledger.sqlite"
    ledger = SqliteLedger(path, node="nwc", policy=POLICY)

    def size() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("nwc.ledger.sqlite*"))

    before = size()
    for _ in range(3):
        ledger.refuse(junk_refusal(1024 * 1024))
    assert size() - before < 3 * 32 * 1024
    ledger.close()
    assert verify(open_file(path)).ok


def old_style_refusal(a: MemoryAccountant, refusal: Refusal) -> None:
    """Append a refusal entry as nodes wrote them before digests: the whole envelope."""
    book = a._book  # the accountant's own key signs the old format
    entry = book._entry(
        book.now(datetime.now(UTC)),
        analyst=refusal.analyst,
        query_id="",
        request={
            "query": query_text(refusal.query),
            "query_sha256": hashlib.sha256(refusal.query).hexdigest(),
            "envelope": base64.b64encode(refusal.envelope).decode("ascii"),
        },
        views=[],
        rho=0.0,
        epsilon=0.0,
        outcome=REFUSED,
        reason=refusal.reason,
        code=refusal.code,
    )
    a._append(entry)


def test_old_and_new_refusal_entries_verify_together(pki: Pki) -> None:
    a = MemoryAccountant(POLICY, node="nwc")
    small = Refusal("alice", b"{not json", b"", "no such view", "INVALID_ARGUMENT")
    old_style_refusal(a, small)
    a.charge(signed_charge(pki.alice, 0.1))
    a.refuse(small)
    old_style_refusal(a, junk_refusal(10_000))
    bodies = [json.loads(e.body) for e in a.entries()]
    assert ["envelope" in b for b in bodies[1:]] == [True, True, False, True]
    result = verify(source_of(a), ca_pem=pki.ca_pem)
    assert result.ok, [str(x) for x in result.anomalies]
    assert (result.released, result.refused) == (1, 3)


def resign_last(a: MemoryAccountant, **changes: object) -> None:
    """Replace the last entry by an edited one, signed with the accountant's own key: only
    the content checks can tell."""
    *rest, last = a.entries()
    body = {**json.loads(last.body), **changes}
    body = {k: v for k, v in body.items() if v is not None}
    raw = canonical_json(body)
    signature = a._book._key.sign(raw)
    a._entries[-1] = type(last)(last.sequence, raw, signature)
    del rest


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"query": '{"view": "cope"}'}, "query_sha256 is not the SHA-256"),
        ({"envelope_sha256": "0" * 64}, "envelope_sha256 is not the SHA-256"),
        ({"envelope_prefix": "not base64!"}, "envelope_prefix is not base64"),
        ({"envelope_size": 3}, "envelope_prefix is longer than its envelope_size"),
        ({"query_size": None}, "neither an envelope nor a well-formed digest"),
        ({"envelope_sha256": "ABC"}, "neither an envelope nor a well-formed digest"),
        ({"rate_limited": {"peer": "x"}}, "rate_limited record is malformed"),
    ],
)
def test_an_edited_digest_is_named(changes: dict[str, object], words: str) -> None:
    a = MemoryAccountant(POLICY, node="nwc")
    a.refuse(Refusal("alice", b'{"view": "copd"}', b"\x0a\x02{}", "no", "INVALID_ARGUMENT"))
    assert verify(source_of(a)).ok
    resign_last(a, **changes)
    head = a._book.head(after=list(a.entries())[-1])
    source = LedgerSource(
        label="edited",
        node="",
        public_key=a.public_key,
        key_origin="test",
        read=lambda: iter([*a.entries(), head]),
    )
    result = verify(source)
    assert any(words in x.problem for x in result.anomalies), [str(x) for x in result.anomalies]


def test_the_rate_limiting_entry_is_recorded_and_noted() -> None:
    a = MemoryAccountant(POLICY, node="nwc")
    until = datetime(2030, 1, 1, tzinfo=UTC)
    limited = RateLimited(peer="demo-auditor", refusals=30, window_seconds=60.0, until=until)
    refusal = Refusal("x", b"", b"", "no (rate-limiting)", "PERMISSION_DENIED", limited)
    a.refuse(refusal)
    assert last_body(a)["rate_limited"] == {
        "peer": "demo-auditor",
        "refusals": 30,
        "window_seconds": 60.0,
        "until": "2030-01-01T00:00:00.000Z",
    }
    result = verify(source_of(a))
    assert result.ok, [str(x) for x in result.anomalies]
    assert any("refusals from demo-auditor were rate-limited after 30" in n for n in result.notes)


# ---- the limiter ----------------------------------------------------------------------------


class Clock:
    """A hand-wound clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_records_n_then_one_saying_so_then_nothing() -> None:
    clock = Clock()
    limiter = RefusalLimiter(3, 60.0, clock=clock)
    decisions = [limiter.admit("mallory") for _ in range(6)]
    assert [(d.record, d.starts) for d in decisions] == [
        (True, False),
        (True, False),
        (True, False),
        (True, True),
        (False, False),
        (False, False),
    ]
    assert [d.refusals for d in decisions] == [1, 2, 3, 4, 5, 6]
    assert decisions[-1].remaining_s == 60.0
    # Others are not affected.
    assert limiter.admit("alice").record
    clock.now += 59.0
    assert not limiter.admit("mallory").record
    assert limiter.admit("mallory").remaining_s == pytest.approx(1.0)
    # A new window: recorded again.
    clock.now += 1.0
    again = limiter.admit("mallory")
    assert (again.record, again.starts, again.refusals) == (True, False, 1)


def test_the_limiter_tracks_a_bounded_number_of_peers() -> None:
    clock = Clock()
    limiter = RefusalLimiter(1, 60.0, clock=clock)
    limiter.MAX_PEERS = 100
    for i in range(100):
        limiter.admit(f"claimed-{i}")
    # Beyond the bound, peers whose windows are open share one.
    assert [limiter.admit(f"new-{i}").record for i in range(4)] == [True, True, False, False]
    assert len(limiter._windows) == 101
    # Once windows end they are forgotten.
    clock.now += 60.0
    assert limiter.admit("later").record
    assert len(limiter._windows) <= 2


def test_a_limiter_needs_a_limit_and_a_window() -> None:
    with pytest.raises(ValueError, match="limit"):
        RefusalLimiter(0, 60.0)
    with pytest.raises(ValueError, match="window"):
        RefusalLimiter(1, 0.0)
