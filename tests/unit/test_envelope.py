"""PKI issuance, identity loading and analyst-signed query envelopes (protocols.security)."""

from __future__ import annotations

import dataclasses
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocols import security, serde
from protocols.security import (
    CA_FILE,
    CA_KEY_FILE,
    CERT_FILE,
    CLOCK_SKEW_MS,
    KEY_FILE,
    LEDGER_PAYLOAD_VERSIONS,
    LEGACY_PAYLOAD_VERSION,
    MAX_ENVELOPE_TTL_MS,
    PAYLOAD_VERSION,
    SIGNATURE_ALGORITHM,
    Audience,
    Call,
    Identity,
    Operation,
    Role,
    SignedQuery,
)
from protocols.v1 import node_pb2
from queries.errors import AuthenticationError, ChcError, ConfigError

QUERY = b'{"rho":0.1,"view":"persons"}'
HUB_1 = Audience(hub="hub-1")
HOUR_MS = 3600 * 1000


@dataclasses.dataclass(frozen=True)
class Pki:
    """A federation CA with one identity per role, and a second, unrelated CA."""

    root: Path
    analyst: Identity
    node: Identity
    hub: Identity
    auditor: Identity
    other_ca_pem: bytes
    other_analyst: Identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    security.create_ca(root)
    ids = {
        role: security.load_identity(security.issue(root, role=role, name=f"{role.value}-1"))
        for role in Role
    }
    # Same CA common name on purpose: only the signature may tell the two CAs apart.
    other = tmp_path_factory.mktemp("other-pki")
    other_ca = security.create_ca(other)
    other_analyst = security.load_identity(
        security.issue(other, role=Role.ANALYST, name="analyst-1")
    )
    return Pki(
        root=root,
        analyst=ids[Role.ANALYST],
        node=ids[Role.NODE],
        hub=ids[Role.HUB],
        auditor=ids[Role.AUDITOR],
        other_ca_pem=other_ca.read_bytes(),
        other_analyst=other_analyst,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(identity: Identity) -> x509.Certificate:
    return x509.load_pem_x509_certificate(identity.cert_pem)


def hand_signed(
    identity: Identity,
    *,
    query: bytes = QUERY,
    analyst: str | None = None,
    nonce: bytes = b"n" * 16,
    issued_at_ms: int | None = None,
    expires_at_ms: int | None = None,
    algorithm: str = SIGNATURE_ALGORITHM,
    operation: Operation = Operation.EXECUTE,
    audience: Audience = HUB_1,
    version: int = PAYLOAD_VERSION,
) -> SignedQuery:
    """An envelope signed with identity's key over exactly these fields, whatever its role.

    version 1 signs the old payload (no operation, no audience), as ledgers still hold.
    """
    issued = security.now_ms() if issued_at_ms is None else issued_at_ms
    expires = issued + 10 * 60 * 1000 if expires_at_ms is None else expires_at_ms
    name = identity.name if analyst is None else analyst
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    if version == LEGACY_PAYLOAD_VERSION:
        payload = security.legacy_signed_payload(
            query=query, analyst=name, nonce=nonce, issued_at_ms=issued, expires_at_ms=expires
        )
        operation_signed: Operation | None = None
        audience = Audience()
    else:
        payload = security.signed_payload(
            query=query,
            analyst=name,
            nonce=nonce,
            issued_at_ms=issued,
            expires_at_ms=expires,
            operation=operation,
            audience=audience,
        )
        operation_signed = operation
    return SignedQuery(
        query=query,
        analyst=name,
        nonce=nonce,
        issued_at_ms=issued,
        expires_at_ms=expires,
        analyst_certificate=identity.cert_pem,
        signature_algorithm=algorithm,
        signature=key.sign(payload, ec.ECDSA(hashes.SHA256())),
        payload_version=version,
        operation=operation_signed,
        audience=audience,
    )


def assert_refused(
    signed: SignedQuery, ca_pem: bytes, match: str | None, at_ms: int | None = None
) -> None:
    """verify_query raises AuthenticationError, which is also a PermissionError."""
    with pytest.raises(AuthenticationError, match=match) as info:
        security.verify_query(signed, ca_pem, at_ms=at_ms)
    assert isinstance(info.value, PermissionError)
    assert isinstance(info.value, ChcError)


# ---- CA and issuance ------------------------------------------------------------------------


def test_create_ca_writes_a_ca_certificate_and_a_private_key(tmp_path: Path) -> None:
    cert_path = security.create_ca(tmp_path / "pki", common_name="test CA")
    assert cert_path == tmp_path / "pki" / CA_FILE
    key_path = tmp_path / "pki" / CA_KEY_FILE
    assert _mode(key_path) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert security.common_name(cert) == "test CA"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_create_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    security.create_ca(tmp_path)
    before = (tmp_path / CA_KEY_FILE).read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        security.create_ca(tmp_path)
    assert (tmp_path / CA_KEY_FILE).read_bytes() == before


@pytest.mark.parametrize("role", list(Role))
def test_issue_puts_the_role_in_the_organizational_unit(pki: Pki, role: Role) -> None:
    folder = security.issue(pki.root, role=role, name=f"issued-{role.value}")
    assert folder == pki.root / role.value / f"issued-{role.value}"
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [u.value for u in units] == [role.value]
    assert security.role_of(cert) is role
    assert security.common_name(cert) == f"issued-{role.value}"
    ca = x509.load_pem_x509_certificate((pki.root / CA_FILE).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (folder / CA_FILE).read_bytes() == (pki.root / CA_FILE).read_bytes()


def test_issued_key_is_private_and_matches_the_certificate(pki: Pki, tmp_path: Path) -> None:
    folder = security.issue(pki.root, role=Role.NODE, name="leeds", out_dir=tmp_path / "id")
    assert folder == tmp_path / "id"
    assert _mode(folder / KEY_FILE) == 0o600
    key = serialization.load_pem_private_key((folder / KEY_FILE).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    assert cert.public_key() == key.public_key()


def test_issue_names_the_hosts_in_the_certificate(pki: Pki, tmp_path: Path) -> None:
    folder = security.issue(
        pki.root,
        role=Role.HUB,
        name="hub-x",
        out_dir=tmp_path,
        hosts=("hub.example.org", "10.0.0.1"),
    )
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"hub-x", "hub.example.org"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]


def test_a_key_file_that_is_a_symlink_is_refused(pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    out = tmp_path / "id"
    out.mkdir()
    (out / KEY_FILE).symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        security.issue(pki.root, role=Role.NODE, name="sym", out_dir=out)
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "..",
        ".",
        ".hidden",
        "a/b",
        "/abs",
        "a\\b",
        "a b",
        "a\x00b",
        "a\nb",
        "x" * 65,
        "name;rm",
    ],
)
def test_issue_refuses_bad_names(pki: Pki, name: str) -> None:
    before = sorted(p.relative_to(pki.root) for p in pki.root.rglob("*"))
    with pytest.raises(ConfigError, match=r"not allowed|may not start"):
        security.issue(pki.root, role=Role.NODE, name=name)
    assert sorted(p.relative_to(pki.root) for p in pki.root.rglob("*")) == before
    assert not (pki.root / "x").exists()


@pytest.mark.parametrize(
    "name", ["\u00e9", "nod\u00e9", "x\u00b2", "\u0661\u0662", "\uff46\uff55\uff4c\uff4c"]
)
def test_issue_refuses_non_ascii_names_with_a_config_error(pki: Pki, name: str) -> None:
    # BUG: _check_name uses str.isalnum(), which accepts any Unicode letter or digit; such a
    # name then reaches x509.DNSName and fails with cryptography's raw ValueError.
    with pytest.raises(ConfigError, match="not allowed"):
        security.issue(pki.root, role=Role.NODE, name=name)


def test_issue_accepts_the_allowed_alphabet(pki: Pki, tmp_path: Path) -> None:
    name = "Node_1.region-A" + "x" * 49
    assert len(name) == 64
    folder = security.issue(pki.root, role=Role.NODE, name=name, out_dir=tmp_path)
    assert security.load_identity(folder).name == name


# ---- identities -----------------------------------------------------------------------------


def test_load_identity_round_trips(pki: Pki) -> None:
    folder = pki.root / Role.ANALYST.value / "analyst-1"
    identity = security.load_identity(folder)
    assert identity.name == "analyst-1"
    assert identity.role is Role.ANALYST
    assert identity.cert_pem == (folder / CERT_FILE).read_bytes()
    assert identity.key_pem == (folder / KEY_FILE).read_bytes()
    assert identity.ca_pem == (pki.root / CA_FILE).read_bytes()


@pytest.mark.parametrize("missing", [CERT_FILE, KEY_FILE, CA_FILE])
def test_load_identity_names_the_missing_file(pki: Pki, tmp_path: Path, missing: str) -> None:
    folder = security.issue(pki.root, role=Role.NODE, name="partial", out_dir=tmp_path / "id")
    (folder / missing).unlink()
    with pytest.raises(ConfigError, match="incomplete") as info:
        security.load_identity(folder)
    assert missing in str(info.value)
    assert "chc pki issue" in str(info.value)


def test_load_identity_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="incomplete"):
        security.load_identity(tmp_path / "nowhere")


def test_identity_repr_hides_the_private_key(pki: Pki) -> None:
    for identity in (pki.analyst, pki.node):
        for text in (repr(identity), str(identity), f"{identity}", f"{identity!r}"):
            assert "PRIVATE KEY" not in text
            assert identity.key_pem.decode() not in text
            assert identity.name in text


def test_role_of_and_common_name_refuse_a_certificate_without_them(pki: Pki) -> None:
    ca = x509.load_pem_x509_certificate((pki.root / CA_FILE).read_bytes())
    with pytest.raises(AuthenticationError, match="no chc role"):
        security.role_of(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    anonymous = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(AuthenticationError, match="no common name"):
        security.common_name(anonymous)


# ---- signed queries -------------------------------------------------------------------------


def test_a_good_envelope_verifies(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    assert signed.query == QUERY
    assert signed.analyst == "analyst-1"
    assert len(signed.nonce) == 16
    assert signed.signature_algorithm == SIGNATURE_ALGORITHM
    assert signed.expires_at_ms - signed.issued_at_ms == 10 * 60 * 1000
    assert security.verify_query(signed, pki.analyst.ca_pem) == "analyst-1"
    # Still good just before it expires, and within the tolerated clock skew before issue.
    assert security.verify_query(signed, pki.analyst.ca_pem, at_ms=signed.expires_at_ms - 1) == (
        "analyst-1"
    )
    assert (
        security.verify_query(
            signed, pki.analyst.ca_pem, at_ms=signed.issued_at_ms - CLOCK_SKEW_MS + 1000
        )
        == "analyst-1"
    )


def test_every_envelope_has_a_fresh_nonce(pki: Pki) -> None:
    nonces = {security.sign_query(pki.analyst, QUERY).nonce for _ in range(20)}
    assert len(nonces) == 20


def test_hand_built_helper_makes_valid_envelopes(pki: Pki) -> None:
    # Guards the helper used below: a refusal must come from the field under test.
    assert security.verify_query(hand_signed(pki.analyst), pki.analyst.ca_pem) == "analyst-1"


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
    signed = security.sign_query(
        pki.analyst, QUERY, operation=Operation.EXPLAIN, audience=Audience(hub="hub-1")
    )
    tampered = TAMPER[field](signed)
    assert tampered != signed
    assert_refused(tampered, pki.analyst.ca_pem, match=None)


def test_tampered_query_bytes_break_the_signature(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    assert_refused(
        dataclasses.replace(signed, query=b'{"rho":9.0,"view":"persons"}'),
        pki.analyst.ca_pem,
        match="signature does not match",
    )


def test_tampered_nonce_breaks_the_signature(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    nonce = bytes([signed.nonce[0] ^ 1]) + signed.nonce[1:]
    assert_refused(
        dataclasses.replace(signed, nonce=nonce), pki.analyst.ca_pem, "signature does not match"
    )


def test_tampered_expiry_breaks_the_signature(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    longer = dataclasses.replace(signed, expires_at_ms=signed.expires_at_ms + HOUR_MS)
    assert_refused(longer, pki.analyst.ca_pem, "signature does not match")


def test_an_analyst_name_not_matching_the_certificate_is_refused(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    assert_refused(
        dataclasses.replace(signed, analyst="someone-else"), pki.analyst.ca_pem, "does not match"
    )
    # Even when the analyst signs the other name itself.
    assert_refused(
        hand_signed(pki.analyst, analyst="someone-else"), pki.analyst.ca_pem, "does not match"
    )


def test_an_envelope_from_another_federation_is_refused(pki: Pki) -> None:
    foreign = security.sign_query(pki.other_analyst, QUERY)
    assert foreign.analyst == pki.analyst.name  # same name, different CA
    assert_refused(foreign, pki.analyst.ca_pem, "not issued by this federation")
    ours = security.sign_query(pki.analyst, QUERY)
    assert_refused(ours, pki.other_ca_pem, "not issued by this federation")


def test_a_certificate_swapped_in_from_another_federation_is_refused(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    swapped = dataclasses.replace(signed, analyst_certificate=pki.other_analyst.cert_pem)
    assert_refused(swapped, pki.analyst.ca_pem, "not issued by this federation")


def test_a_garbage_certificate_is_refused(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    assert_refused(
        dataclasses.replace(signed, analyst_certificate=b"not a certificate"),
        pki.analyst.ca_pem,
        "not valid PEM",
    )


def test_an_expired_envelope_is_refused(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY, ttl_ms=60_000)
    assert_refused(signed, pki.analyst.ca_pem, "expired", at_ms=signed.expires_at_ms)
    assert_refused(signed, pki.analyst.ca_pem, "expired", at_ms=signed.expires_at_ms + HOUR_MS)


def test_an_envelope_issued_in_the_future_is_refused(pki: Pki) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
    assert_refused(
        signed, pki.analyst.ca_pem, "in the future", at_ms=signed.issued_at_ms - CLOCK_SKEW_MS - 1
    )
    issued = security.now_ms() + 2 * CLOCK_SKEW_MS
    assert_refused(hand_signed(pki.analyst, issued_at_ms=issued), pki.analyst.ca_pem, "future")


def test_an_envelope_valid_for_more_than_a_day_is_refused(pki: Pki) -> None:
    now = security.now_ms()
    too_long = hand_signed(
        pki.analyst, issued_at_ms=now, expires_at_ms=now + MAX_ENVELOPE_TTL_MS + 1
    )
    assert_refused(too_long, pki.analyst.ca_pem, "longer than 24 hours")
    one_day = hand_signed(pki.analyst, issued_at_ms=now, expires_at_ms=now + MAX_ENVELOPE_TTL_MS)
    assert security.verify_query(one_day, pki.analyst.ca_pem) == "analyst-1"


@pytest.mark.parametrize("ttl_ms", [0, -1, MAX_ENVELOPE_TTL_MS + 1])
def test_sign_query_refuses_a_bad_ttl(pki: Pki, ttl_ms: int) -> None:
    with pytest.raises(ConfigError, match="ttl_ms"):
        security.sign_query(pki.analyst, QUERY, ttl_ms=ttl_ms)


def test_an_expired_analyst_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    folder = security.issue(pki.root, role=Role.ANALYST, name="short", days=1, out_dir=tmp_path)
    identity = security.load_identity(folder)
    later = security.now_ms() + 3 * 24 * HOUR_MS
    signed = hand_signed(identity, issued_at_ms=later)
    assert_refused(signed, pki.analyst.ca_pem, "certificate has expired", at_ms=later + 1000)


@pytest.mark.parametrize("role", [Role.NODE, Role.HUB, Role.AUDITOR])
def test_only_analysts_sign_queries(pki: Pki, role: Role) -> None:
    identity = {Role.NODE: pki.node, Role.HUB: pki.hub, Role.AUDITOR: pki.auditor}[role]
    with pytest.raises(AuthenticationError, match="only analysts"):
        security.sign_query(identity, QUERY)
    # A hand-built envelope with a valid signature by a non-analyst is refused by the node.
    assert_refused(hand_signed(identity), pki.analyst.ca_pem, "analyst certificate")


@pytest.mark.parametrize("algorithm", ["", "ed25519", "ECDSA-P256-SHA256", "none"])
def test_a_wrong_signature_algorithm_is_refused(pki: Pki, algorithm: str) -> None:
    signed = security.sign_query(pki.analyst, QUERY)
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
    return security.signed_payload(**{**PAYLOAD_FIELDS, **changes})  # type: ignore[arg-type]


def test_signed_payload_is_canonical_and_domain_separated() -> None:
    payload = _payload()
    assert payload.startswith(b"chc.v1.QueryEnvelope.payload-v2\n")
    reordered = dict(reversed(list(PAYLOAD_FIELDS.items())))
    assert payload == security.signed_payload(**reordered)  # type: ignore[arg-type]
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
    assert security.verify_query(signed, pki.analyst.ca_pem) == "analyst-1"
    for changed in (
        dataclasses.replace(signed, operation=Operation.EXECUTE),
        dataclasses.replace(signed, operation=Operation.BUDGET),
        dataclasses.replace(signed, audience=Audience("hub-2", ("nenc",))),
        dataclasses.replace(signed, audience=Audience("hub-1")),
        dataclasses.replace(signed, audience=Audience("hub-1", ("nenc", "yh"))),
    ):
        assert_refused(changed, pki.analyst.ca_pem, "signature does not match")


def test_the_payload_version_is_bound_by_its_domain_tag() -> None:
    legacy = security.legacy_signed_payload(
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
    assert security.verify_query(old, pki.analyst.ca_pem, versions=LEDGER_PAYLOAD_VERSIONS) == (
        "analyst-1"
    )


def test_a_signature_never_verifies_under_the_other_payload_version(pki: Pki) -> None:
    new = hand_signed(pki.analyst)
    old = hand_signed(pki.analyst, version=LEGACY_PAYLOAD_VERSION)
    both = LEDGER_PAYLOAD_VERSIONS
    for relabelled in (
        dataclasses.replace(new, payload_version=LEGACY_PAYLOAD_VERSION),
        dataclasses.replace(old, payload_version=PAYLOAD_VERSION, operation=Operation.EXECUTE),
    ):
        with pytest.raises(AuthenticationError, match="signature does not match"):
            security.verify_query(relabelled, pki.analyst.ca_pem, versions=both)


@pytest.mark.parametrize("version", [0, 3, 2**32 - 1])
def test_an_unknown_payload_version_is_refused(pki: Pki, version: int) -> None:
    signed = dataclasses.replace(hand_signed(pki.analyst), payload_version=version)
    assert_refused(signed, pki.analyst.ca_pem, f"payload version {version} ")
    with pytest.raises(AuthenticationError, match="payload version"):
        security.verify_query(signed, pki.analyst.ca_pem, versions=LEDGER_PAYLOAD_VERSIONS)


def test_a_version_2_envelope_without_an_operation_is_refused(pki: Pki) -> None:
    signed = dataclasses.replace(hand_signed(pki.analyst), operation=None)
    assert_refused(signed, pki.analyst.ca_pem, "does not say which operation")


def test_sign_query_signs_the_operation_and_audience(pki: Pki) -> None:
    signed = security.sign_query(
        pki.analyst,
        QUERY,
        operation=Operation.BUDGET,
        audience=Audience(hub="hub-1", nodes=("yh", "nenc", "yh")),
    )
    assert signed.payload_version == PAYLOAD_VERSION
    assert signed.operation is Operation.BUDGET
    assert signed.audience == Audience(hub="hub-1", nodes=("nenc", "yh"))
    assert security.verify_query(signed, pki.analyst.ca_pem) == "analyst-1"
    # By default: to execute, and through no hub (only the analyst can present it).
    default = security.sign_query(pki.analyst, QUERY)
    assert (default.operation, default.audience) == (Operation.EXECUTE, Audience())


@pytest.mark.parametrize(
    "audience", [Audience(hub="../hub"), Audience(hub="hub-1", nodes=("a b",))]
)
def test_sign_query_refuses_a_bad_audience_name(pki: Pki, audience: Audience) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        security.sign_query(pki.analyst, QUERY, audience=audience)


def test_an_envelope_round_trips_the_wire_and_still_verifies(pki: Pki) -> None:
    signed = security.sign_query(
        pki.analyst, QUERY, operation=Operation.EXPLAIN, audience=Audience("hub-1", ("nenc",))
    )
    wire = serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)
    back = serde.signed_query_from_proto(node_pb2.QueryEnvelope.FromString(wire))
    assert back == signed
    assert security.verify_query(back, pki.analyst.ca_pem) == "analyst-1"


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
    msg = serde.signed_query_to_proto(security.sign_query(pki.analyst, QUERY))
    msg.operation = 99  # type: ignore[assignment]
    assert serde.signed_query_from_proto(msg).operation is None


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
    signed = dataclasses.replace(security.sign_query(pki.analyst, QUERY), operation=operation)
    if accepted:
        security.check_operation(signed, call)
        return
    with pytest.raises(AuthenticationError, match="sign") as info:
        security.check_operation(signed, call)
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
    signed = security.sign_query(pki.analyst, QUERY, audience=audience)
    if problem is None:
        security.check_audience(signed, node=node, hub=hub)
        return
    with pytest.raises(AuthenticationError, match=problem):
        security.check_audience(signed, node=node, hub=hub)


def test_authentication_error_is_a_permission_error() -> None:
    assert issubclass(AuthenticationError, PermissionError)
    assert issubclass(AuthenticationError, ChcError)
