"""Idempotent retries, below the service: a charge keeps its release, atomically.

Run against every Accountant (Flower's state pattern): the release kept with a charge is
found by the envelope's SHA-256 until the envelope expires, a refused charge keeps nothing,
and (SQLite) the kept release survives reopening the ledger and is visible to a second
process's connection. NonceStore's begin/finish is tested with real threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.audit.verification import verify
from node.budget.accounting import Keep
from node.budget.ledger import SqliteLedger
from node.guards import NonceStore
from protocols.budget.policy import BudgetPolicy
from protocols.security.envelope import now_ms
from queries.errors import AuthenticationError, BudgetExceededError
from tests.unit._accounting_helpers import (
    KINDS,
    Factory,
    Pki,
    accountants,
    make_pki,
    signed_charge,
    source_of,
)

POLICY = BudgetPolicy(total_rho=1.0, max_rho_per_query=0.6)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=KINDS)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    with accountants(request.param, tmp_path) as factory:
        yield factory


def _keep(tag: bytes, *, ttl_ms: int = 60_000) -> Keep:
    return Keep(
        envelope_sha256=hashlib.sha256(tag).digest(),
        expires_at_ms=now_ms() + ttl_ms,
        response=b"release of " + tag,
    )


def test_a_charge_keeps_its_release_under_the_envelope_digest(make: Factory, pki: Pki) -> None:
    ledger = make(POLICY)
    keep = _keep(b"first")
    _, sequence = ledger.charge(signed_charge(pki.alice, 0.5), keep)
    kept = ledger.stored_release(keep.envelope_sha256)
    assert kept is not None
    assert (kept.sequence, kept.response) == (sequence, b"release of first")
    assert ledger.stored_release(hashlib.sha256(b"other").digest()) is None
    # Keeping a release changes nothing the auditor reads: the chain verifies.
    assert verify(source_of(ledger)).ok


def test_a_refused_charge_keeps_nothing(make: Factory, pki: Pki) -> None:
    ledger = make(POLICY)
    ledger.charge(signed_charge(pki.alice, 0.6))
    keep = _keep(b"over the cap")
    with pytest.raises(BudgetExceededError):
        ledger.charge(signed_charge(pki.alice, 0.6), keep)
    assert ledger.stored_release(keep.envelope_sha256) is None


def test_an_expired_envelope_has_no_kept_release(make: Factory, pki: Pki) -> None:
    ledger = make(POLICY)
    keep = _keep(b"short-lived", ttl_ms=-1)
    ledger.charge(signed_charge(pki.alice, 0.1), keep)
    assert ledger.stored_release(keep.envelope_sha256) is None


def test_kept_releases_survive_reopening_and_other_connections(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "node.ledger.sqlite"
    first = SqliteLedger(path, node="n", policy=POLICY)
    keep = _keep(b"durable")
    _, sequence = first.charge(signed_charge(pki.alice, 0.2), keep)
    # A second process's connection to the same file sees it at once.
    other = SqliteLedger(path, node="n", policy=POLICY)
    seen = other.stored_release(keep.envelope_sha256)
    assert seen is not None
    assert seen.sequence == sequence
    other.close()
    first.close()
    reopened = SqliteLedger(path, node="n", policy=POLICY)
    again = reopened.stored_release(keep.envelope_sha256)
    assert again is not None
    assert again.response == b"release of durable"
    reopened.close()


def test_a_new_charge_prunes_expired_kept_releases(tmp_path: Path, pki: Pki) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite", node="n", policy=POLICY)
    ledger.charge(signed_charge(pki.alice, 0.1), _keep(b"old", ttl_ms=-1))
    ledger.charge(signed_charge(pki.alice, 0.1), _keep(b"new"))
    con = ledger._con  # the file's own rows: what a full disk would hold
    rows = [bytes(r[0]) for r in con.execute("SELECT response FROM releases")]
    assert rows == [b"release of new"]
    ledger.close()


# NonceStore.begin / finish -------------------------------------------------------------


def test_the_first_call_owns_an_envelope_and_a_charged_one_stays_claimed() -> None:
    nonces = NonceStore()
    assert nonces.begin(b"n1", b"d1").owner
    nonces.finish(b"n1", now_ms() + 60_000, charged=True)
    again = nonces.begin(b"n1", b"d1")
    assert not again.owner
    assert again.pending is None


def test_an_uncharged_attempt_frees_its_nonce_for_a_retry() -> None:
    nonces = NonceStore()
    assert nonces.begin(b"n1", b"d1").owner
    nonces.finish(b"n1", now_ms() + 60_000, charged=False)
    assert nonces.begin(b"n1", b"d1").owner


def test_a_retry_during_the_first_call_waits_for_it() -> None:
    nonces = NonceStore()
    assert nonces.begin(b"n1", b"d1").owner
    second = nonces.begin(b"n1", b"d1")
    assert not second.owner
    assert second.pending is not None
    assert not second.pending.is_set()
    done = threading.Event()

    def finish_later() -> None:
        nonces.finish(b"n1", now_ms() + 60_000, charged=True)
        done.set()

    threading.Timer(0.05, finish_later).start()
    assert second.pending.wait(timeout=10)
    assert done.wait(timeout=10)


def test_another_envelope_with_a_running_nonce_is_refused() -> None:
    nonces = NonceStore()
    assert nonces.begin(b"n1", b"d1").owner
    with pytest.raises(AuthenticationError, match="being answered"):
        nonces.begin(b"n1", b"d2")


def test_a_fit_cannot_claim_a_nonce_an_execute_is_running() -> None:
    nonces = NonceStore()
    assert nonces.begin(b"n1", b"d1").owner
    with pytest.raises(AuthenticationError):
        nonces.claim(b"n1", now_ms() + 60_000)
