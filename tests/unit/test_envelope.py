"""Signing, verifying and what analyst envelopes authorise (protocols.security.envelope)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from protocols.security.envelope import (
    CLOCK_SKEW_MS,
    MAX_ENVELOPE_TTL_MS,
    SIGNATURE_ALGORITHM,
    Audience,
    Call,
    Operation,
    SignedQuery,
    check_audience,
    check_operation,
    now_ms,
    sign_query,
    verify_query,
)
from protocols.security.pki import Role, issue, load_identity
from queries.errors import AuthenticationError, ChcError, ConfigError
from tests.unit._security_helpers import HOUR_MS, QUERY, Pki, assert_refused, hand_signed, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory)


# ---- signed queries -------------------------------------------------------------------------


def test_a_good_envelope_verifies(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    assert signed.query == QUERY
    assert signed.analyst == "analyst-1"
    assert len(signed.nonce) == 16
    assert signed.signature_algorithm == SIGNATURE_ALGORITHM
    assert signed.expires_at_ms - signed.issued_at_ms == 10 * 60 * 1000
    assert verify_query(signed, pki.analyst.ca_pem) == "analyst-1"
    # Still good just before it expires, and within the tolerated clock skew before issue.
    assert verify_query(signed, pki.analyst.ca_pem, at_ms=signed.expires_at_ms - 1) == ("analyst-1")
    assert (
        verify_query(signed, pki.analyst.ca_pem, at_ms=signed.issued_at_ms - CLOCK_SKEW_MS + 1000)
        == "analyst-1"
    )


def test_every_envelope_has_a_fresh_nonce(pki: Pki) -> None:
    nonces = {sign_query(pki.analyst, QUERY).nonce for _ in range(20)}
    assert len(nonces) == 20


def test_hand_built_helper_makes_valid_envelopes(pki: Pki) -> None:
    # Guards the helper used below: a refusal must come from the field under test.
    assert verify_query(hand_signed(pki.analyst), pki.analyst.ca_pem) == "analyst-1"


TAMPER: dict[str, Callable[[SignedQuery], SignedQuery]] = {
    "query": lambda s: dataclasses.replace(s, query=s.query.replace(b"0.1", b"0.9")),
    "query-appended": lambda s: dataclasses.replace(s, query=s.query + b" "),
    "query-empty": lambda s: dataclasses.replace(s, query=b""),
    "nonce": lambda s: dataclasses.replace(s, nonce=b"m" * 16),
    "analyst": lambda s: dataclasses.replace(s, analyst="analyst-2"),
    "issued": lambda s: dataclasses.replace(s, issued_at_ms=s.issued_at_ms - 1000),
    "expires": lambda s: dataclasses.replace(s, expires_at_ms=s.expires_at_ms + 1000),
    "signature": lambda s: dataclasses.replace(s, signature=b"\x00" * 70),
    "signature-empty": lambda s: dataclasses.replace(s, signature=b""),
    "operation": lambda s: dataclasses.replace(s, operation=Operation.EXECUTE),
    "operation-none": lambda s: dataclasses.replace(s, operation=None),
    "audience-hub": lambda s: dataclasses.replace(s, audience=Audience(hub="hub-2")),
    "audience-no-hub": lambda s: dataclasses.replace(s, audience=Audience()),
    "audience-nodes": lambda s: dataclasses.replace(
        s, audience=Audience(hub="hub-1", nodes=("node-1",))
    ),
    "payload-version-1": lambda s: dataclasses.replace(s, payload_version=1),
    "payload-version-3": lambda s: dataclasses.replace(s, payload_version=3),
}


@pytest.mark.parametrize("field", sorted(TAMPER))
def test_tampered_envelopes_are_refused(pki: Pki, field: str) -> None:
    signed = sign_query(
        pki.analyst, QUERY, operation=Operation.EXPLAIN, audience=Audience(hub="hub-1")
    )
    tampered = TAMPER[field](signed)
    assert tampered != signed
    assert_refused(tampered, pki.analyst.ca_pem, match=None)


def test_tampered_query_bytes_break_the_signature(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    assert_refused(
        dataclasses.replace(signed, query=b'{"rho":9.0,"view":"persons"}'),
        pki.analyst.ca_pem,
        match="signature does not match",
    )


def test_tampered_nonce_breaks_the_signature(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    nonce = bytes([signed.nonce[0] ^ 1]) + signed.nonce[1:]
    assert_refused(
        dataclasses.replace(signed, nonce=nonce), pki.analyst.ca_pem, "signature does not match"
    )


def test_tampered_expiry_breaks_the_signature(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    longer = dataclasses.replace(signed, expires_at_ms=signed.expires_at_ms + HOUR_MS)
    assert_refused(longer, pki.analyst.ca_pem, "signature does not match")


def test_an_analyst_name_not_matching_the_certificate_is_refused(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    assert_refused(
        dataclasses.replace(signed, analyst="someone-else"), pki.analyst.ca_pem, "does not match"
    )
    # Even when the analyst signs the other name itself.
    assert_refused(
        hand_signed(pki.analyst, analyst="someone-else"), pki.analyst.ca_pem, "does not match"
    )


def test_an_envelope_from_another_federation_is_refused(pki: Pki) -> None:
    foreign = sign_query(pki.other_analyst, QUERY)
    assert foreign.analyst == pki.analyst.name  # same name, different CA
    assert_refused(foreign, pki.analyst.ca_pem, "not issued by this federation")
    ours = sign_query(pki.analyst, QUERY)
    assert_refused(ours, pki.other_ca_pem, "not issued by this federation")


def test_a_certificate_swapped_in_from_another_federation_is_refused(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    swapped = dataclasses.replace(signed, analyst_certificate=pki.other_analyst.cert_pem)
    assert_refused(swapped, pki.analyst.ca_pem, "not issued by this federation")


def test_a_garbage_certificate_is_refused(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    assert_refused(
        dataclasses.replace(signed, analyst_certificate=b"not a certificate"),
        pki.analyst.ca_pem,
        "not valid PEM",
    )


def test_an_expired_envelope_is_refused(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY, ttl_ms=60_000)
    assert_refused(signed, pki.analyst.ca_pem, "expired", at_ms=signed.expires_at_ms)
    assert_refused(signed, pki.analyst.ca_pem, "expired", at_ms=signed.expires_at_ms + HOUR_MS)


def test_an_envelope_issued_in_the_future_is_refused(pki: Pki) -> None:
    signed = sign_query(pki.analyst, QUERY)
    assert_refused(
        signed, pki.analyst.ca_pem, "in the future", at_ms=signed.issued_at_ms - CLOCK_SKEW_MS - 1
    )
    issued = now_ms() + 2 * CLOCK_SKEW_MS
    assert_refused(hand_signed(pki.analyst, issued_at_ms=issued), pki.analyst.ca_pem, "future")


def test_an_envelope_valid_for_more_than_a_day_is_refused(pki: Pki) -> None:
    now = now_ms()
    too_long = hand_signed(
        pki.analyst, issued_at_ms=now, expires_at_ms=now + MAX_ENVELOPE_TTL_MS + 1
    )
    assert_refused(too_long, pki.analyst.ca_pem, "longer than 24 hours")
    one_day = hand_signed(pki.analyst, issued_at_ms=now, expires_at_ms=now + MAX_ENVELOPE_TTL_MS)
    assert verify_query(one_day, pki.analyst.ca_pem) == "analyst-1"


@pytest.mark.parametrize("ttl_ms", [0, -1, MAX_ENVELOPE_TTL_MS + 1])
def test_sign_query_refuses_a_bad_ttl(pki: Pki, ttl_ms: int) -> None:
    with pytest.raises(ConfigError, match="ttl_ms"):
        sign_query(pki.analyst, QUERY, ttl_ms=ttl_ms)


def test_an_expired_analyst_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    folder = issue(pki.root, role=Role.ANALYST, name="short", days=1, out_dir=tmp_path)
    identity = load_identity(folder)
    later = now_ms() + 3 * 24 * HOUR_MS
    signed = hand_signed(identity, issued_at_ms=later)
    assert_refused(signed, pki.analyst.ca_pem, "certificate has expired", at_ms=later + 1000)


@pytest.mark.parametrize("role", [Role.NODE, Role.HUB, Role.AUDITOR])
def test_only_analysts_sign_queries(pki: Pki, role: Role) -> None:
    identity = {Role.NODE: pki.node, Role.HUB: pki.hub, Role.AUDITOR: pki.auditor}[role]
    with pytest.raises(AuthenticationError, match="only analysts"):
        sign_query(identity, QUERY)
    # A hand-built envelope with a valid signature by a non-analyst is refused by the node.
    assert_refused(hand_signed(identity), pki.analyst.ca_pem, "analyst certificate")


@pytest.mark.parametrize("algorithm", ["", "ed25519", "ECDSA-P256-SHA256", "none"])
def test_a_wrong_signature_algorithm_is_refused(pki: Pki, algorithm: str) -> None:
    signed = sign_query(pki.analyst, QUERY)
    assert_refused(
        dataclasses.replace(signed, signature_algorithm=algorithm),
        pki.analyst.ca_pem,
        "unsupported signature algorithm",
    )
    assert_refused(
        hand_signed(pki.analyst, algorithm=algorithm),
        pki.analyst.ca_pem,
        "unsupported signature algorithm",
    )


def test_a_short_nonce_is_refused(pki: Pki) -> None:
    assert_refused(hand_signed(pki.analyst, nonce=b"n" * 15), pki.analyst.ca_pem, "nonce")
    assert_refused(hand_signed(pki.analyst, nonce=b""), pki.analyst.ca_pem, "nonce")


# ---- what an envelope authorises ------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "call", "accepted"),
    [
        (Operation.EXECUTE, Call.EXECUTE, True),
        (Operation.EXPLAIN, Call.EXECUTE, False),
        (Operation.BUDGET, Call.EXECUTE, False),
        (None, Call.EXECUTE, False),
        # Explaining spends nothing, so it takes every operation's envelope...
        (Operation.EXECUTE, Call.EXPLAIN, True),
        (Operation.EXPLAIN, Call.EXPLAIN, True),
        (Operation.BUDGET, Call.EXPLAIN, True),
        # ...but never one that says nothing.
        (None, Call.EXPLAIN, False),
    ],
)
def test_which_operation_each_call_accepts(
    pki: Pki, operation: Operation | None, call: Call, accepted: bool
) -> None:
    signed = dataclasses.replace(sign_query(pki.analyst, QUERY), operation=operation)
    if accepted:
        check_operation(signed, call)
        return
    with pytest.raises(AuthenticationError, match="sign") as info:
        check_operation(signed, call)
    if call is Call.EXECUTE and operation is not None:
        assert "not to execute it" in str(info.value)
        assert "nothing was" in str(info.value)


@pytest.mark.parametrize(
    ("audience", "node", "hub", "problem"),
    [
        (Audience(hub="hub-1"), "nenc", "hub-1", None),
        (Audience(hub="hub-1"), "nenc", None, None),  # the analyst itself, directly
        (Audience(), "nenc", None, None),
        (Audience(hub="hub-1", nodes=("nenc", "yh")), "yh", "hub-1", None),
        (Audience(hub="hub-1"), "nenc", "hub-2", "addressed to hub 'hub-1', not to hub 'hub-2'"),
        (Audience(), "nenc", "hub-1", "no hub may relay it"),
        (Audience(hub="hub-1", nodes=("yh",)), "nenc", "hub-1", "addressed to node.s. yh, not"),
        (Audience(hub="hub-1", nodes=("yh",)), "nenc", None, "not to 'nenc'"),
    ],
)
def test_who_an_audience_admits(
    pki: Pki, audience: Audience, node: str, hub: str | None, problem: str | None
) -> None:
    signed = sign_query(pki.analyst, QUERY, audience=audience)
    if problem is None:
        check_audience(signed, node=node, hub=hub)
        return
    with pytest.raises(AuthenticationError, match=problem):
        check_audience(signed, node=node, hub=hub)


def test_authentication_error_is_a_permission_error() -> None:
    assert issubclass(AuthenticationError, PermissionError)
    assert issubclass(AuthenticationError, ChcError)
