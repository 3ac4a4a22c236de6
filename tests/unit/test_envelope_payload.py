"""What an analyst signs (protocols.security.envelope): the payload, its versions, the wire."""

from __future__ import annotations

import dataclasses
import json

import pytest

from protocols import serde
from protocols.security.envelope import (
    LEDGER_PAYLOAD_VERSIONS,
    LEGACY_PAYLOAD_VERSION,
    PAYLOAD_VERSION,
    Audience,
    Operation,
    legacy_signed_payload,
    sign_query,
    signed_payload,
    verify_query,
)
from protocols.v1 import node_pb2
from queries.errors import AuthenticationError, ConfigError
from tests.unit._security_helpers import QUERY, Pki, assert_refused, hand_signed, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory)


# ---- the signed payload and its versions ---------------------------------------------------


PAYLOAD_FIELDS: dict[str, object] = {
    "query": QUERY,
    "analyst": "a",
    "nonce": b"\x00" * 16,
    "issued_at_ms": 1,
    "expires_at_ms": 2,
    "operation": Operation.EXPLAIN,
    "audience": Audience(hub="hub-1", nodes=("nenc", "yh")),
}


def _payload(**changes: object) -> bytes:
    return signed_payload(**{**PAYLOAD_FIELDS, **changes})  # type: ignore[arg-type]


def test_signed_payload_is_canonical_and_domain_separated() -> None:
    payload = _payload()
    assert payload.startswith(b"chc.v1.QueryEnvelope.payload-v2\n")
    reordered = dict(reversed(list(PAYLOAD_FIELDS.items())))
    assert payload == signed_payload(**reordered)  # type: ignore[arg-type]
    # The node audience is a set: its order and repeats are not part of what is signed.
    assert payload == _payload(audience=Audience(hub="hub-1", nodes=("yh", "nenc", "yh")))
    body = json.loads(payload.split(b"\n", 1)[1])
    assert body["operation"] == "explain"
    assert body["audience"] == {"hub": "hub-1", "nodes": ["nenc", "yh"]}


# Every signed field, changed: each must change the bytes signed.
PAYLOAD_CHANGES: dict[str, object] = {
    "query": b'{"rho":0.2,"view":"persons"}',
    "analyst": "b",
    "nonce": b"\x01" * 16,
    "issued_at_ms": 0,
    "expires_at_ms": 3,
    "operation": Operation.EXECUTE,
    "audience": Audience(hub="hub-2", nodes=("nenc", "yh")),
}
PAYLOAD_CHANGES_MORE: list[tuple[str, object]] = [
    ("operation", Operation.BUDGET),
    ("audience", Audience(nodes=("nenc", "yh"))),  # no hub
    ("audience", Audience(hub="hub-1")),  # every node
    ("audience", Audience(hub="hub-1", nodes=("nenc",))),
    ("audience", Audience(hub="hub-1", nodes=("nenc", "yh", "gm"))),
    # The fields are kept apart: moving a name from hub to node list is another payload.
    ("audience", Audience(hub="nenc", nodes=("hub-1", "yh"))),
]


@pytest.mark.parametrize(
    ("field", "value"), [*PAYLOAD_CHANGES.items(), *PAYLOAD_CHANGES_MORE], ids=repr
)
def test_every_field_changes_the_signed_payload(field: str, value: object) -> None:
    assert set(PAYLOAD_CHANGES) == set(PAYLOAD_FIELDS)  # no field is left out
    assert _payload(**{field: value}) != _payload()


def test_every_field_changes_what_verifies(pki: Pki) -> None:
    """A signature over one set of fields never verifies for an envelope with another."""
    signed = hand_signed(
        pki.analyst, operation=Operation.EXPLAIN, audience=Audience("hub-1", ("nenc",))
    )
    assert verify_query(signed, pki.analyst.ca_pem) == "analyst-1"
    for changed in (
        dataclasses.replace(signed, operation=Operation.EXECUTE),
        dataclasses.replace(signed, operation=Operation.BUDGET),
        dataclasses.replace(signed, audience=Audience("hub-2", ("nenc",))),
        dataclasses.replace(signed, audience=Audience("hub-1")),
        dataclasses.replace(signed, audience=Audience("hub-1", ("nenc", "yh"))),
    ):
        assert_refused(changed, pki.analyst.ca_pem, "signature does not match")


def test_the_payload_version_is_bound_by_its_domain_tag() -> None:
    legacy = legacy_signed_payload(
        query=QUERY, analyst="a", nonce=b"\x00" * 16, issued_at_ms=1, expires_at_ms=2
    )
    # Version 1 bytes are exactly what analysts signed before version 2 existed.
    assert legacy == (
        b'chc.v1.QueryEnvelope\n{"analyst":"a","expires_at_ms":2,"issued_at_ms":1,'
        b'"nonce":"AAAAAAAAAAAAAAAAAAAAAA==","query":"eyJyaG8iOjAuMSwidmlldyI6InBlcnNvbnMifQ=="}'
    )
    # Neither version's first line is a prefix of the other's: no payload reads as both.
    assert legacy.split(b"\n", 1)[0] != _payload().split(b"\n", 1)[0]
    assert not _payload().startswith(legacy.split(b"\n", 1)[0] + b"\n")


def test_a_version_1_envelope_is_refused_with_what_to_do(pki: Pki) -> None:
    old = hand_signed(pki.analyst, version=LEGACY_PAYLOAD_VERSION)
    assert_refused(old, pki.analyst.ca_pem, r"version-1 format.*sign the query again")
    # Auditors still verify it: ledgers written before version 2 hold such envelopes.
    assert verify_query(old, pki.analyst.ca_pem, versions=LEDGER_PAYLOAD_VERSIONS) == ("analyst-1")


def test_a_signature_never_verifies_under_the_other_payload_version(pki: Pki) -> None:
    new = hand_signed(pki.analyst)
    old = hand_signed(pki.analyst, version=LEGACY_PAYLOAD_VERSION)
    both = LEDGER_PAYLOAD_VERSIONS
    for relabelled in (
        dataclasses.replace(new, payload_version=LEGACY_PAYLOAD_VERSION),
        dataclasses.replace(old, payload_version=PAYLOAD_VERSION, operation=Operation.EXECUTE),
    ):
        with pytest.raises(AuthenticationError, match="signature does not match"):
            verify_query(relabelled, pki.analyst.ca_pem, versions=both)


@pytest.mark.parametrize("version", [0, 3, 2**32 - 1])
def test_an_unknown_payload_version_is_refused(pki: Pki, version: int) -> None:
    signed = dataclasses.replace(hand_signed(pki.analyst), payload_version=version)
    assert_refused(signed, pki.analyst.ca_pem, f"payload version {version} ")
    with pytest.raises(AuthenticationError, match="payload version"):
        verify_query(signed, pki.analyst.ca_pem, versions=LEDGER_PAYLOAD_VERSIONS)


def test_a_version_2_envelope_without_an_operation_is_refused(pki: Pki) -> None:
    signed = dataclasses.replace(hand_signed(pki.analyst), operation=None)
    assert_refused(signed, pki.analyst.ca_pem, "does not say which operation")


def test_sign_query_signs_the_operation_and_audience(pki: Pki) -> None:
    signed = sign_query(
        pki.analyst,
        QUERY,
        operation=Operation.BUDGET,
        audience=Audience(hub="hub-1", nodes=("yh", "nenc", "yh")),
    )
    assert signed.payload_version == PAYLOAD_VERSION
    assert signed.operation is Operation.BUDGET
    assert signed.audience == Audience(hub="hub-1", nodes=("nenc", "yh"))
    assert verify_query(signed, pki.analyst.ca_pem) == "analyst-1"
    # By default: to execute, and through no hub (only the analyst can present it).
    default = sign_query(pki.analyst, QUERY)
    assert (default.operation, default.audience) == (Operation.EXECUTE, Audience())


@pytest.mark.parametrize(
    "audience", [Audience(hub="../hub"), Audience(hub="hub-1", nodes=("a b",))]
)
def test_sign_query_refuses_a_bad_audience_name(pki: Pki, audience: Audience) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        sign_query(pki.analyst, QUERY, audience=audience)


def test_an_envelope_round_trips_the_wire_and_still_verifies(pki: Pki) -> None:
    signed = sign_query(
        pki.analyst, QUERY, operation=Operation.EXPLAIN, audience=Audience("hub-1", ("nenc",))
    )
    wire = serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)
    back = serde.signed_query_from_proto(node_pb2.QueryEnvelope.FromString(wire))
    assert back == signed
    assert verify_query(back, pki.analyst.ca_pem) == "analyst-1"


def test_a_version_1_envelope_keeps_its_bytes_through_serde(pki: Pki) -> None:
    """Ledgers store envelopes as received: reading and re-writing one changes nothing."""
    old = hand_signed(pki.analyst, version=LEGACY_PAYLOAD_VERSION)
    msg = node_pb2.QueryEnvelope(
        query=old.query,
        analyst=old.analyst,
        nonce=old.nonce,
        issued_at_ms=old.issued_at_ms,
        expires_at_ms=old.expires_at_ms,
        analyst_certificate=old.analyst_certificate,
        signature_algorithm=old.signature_algorithm,
        signature=old.signature,
    )  # the fields a version-1 envelope had, and nothing else
    read = serde.signed_query_from_proto(msg)
    assert read == old
    assert serde.signed_query_to_proto(read).SerializeToString(deterministic=True) == (
        msg.SerializeToString(deterministic=True)
    )


def test_an_unknown_wire_operation_reads_as_none(pki: Pki) -> None:
    msg = serde.signed_query_to_proto(sign_query(pki.analyst, QUERY))
    msg.operation = 99  # type: ignore[assignment]
    assert serde.signed_query_from_proto(msg).operation is None
