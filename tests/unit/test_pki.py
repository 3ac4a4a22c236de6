"""The federation PKI (protocols.security.pki): the CA, issuing certificates, identities."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocols.security.pki import (
    CA_FILE,
    CA_KEY_FILE,
    CERT_FILE,
    KEY_FILE,
    Identity,
    Role,
    common_name,
    create_ca,
    issue,
    load_identity,
    role_of,
)
from queries.errors import AuthenticationError, ConfigError
from tests.unit._security_helpers import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(identity: Identity) -> x509.Certificate:
    return x509.load_pem_x509_certificate(identity.cert_pem)


# ---- CA and issuance ------------------------------------------------------------------------


def test_create_ca_writes_a_ca_certificate_and_a_private_key(tmp_path: Path) -> None:
    cert_path = create_ca(tmp_path / "pki", common_name="test CA")
    assert cert_path == tmp_path / "pki" / CA_FILE
    key_path = tmp_path / "pki" / CA_KEY_FILE
    assert _mode(key_path) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert common_name(cert) == "test CA"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_create_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    create_ca(tmp_path)
    before = (tmp_path / CA_KEY_FILE).read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        create_ca(tmp_path)
    assert (tmp_path / CA_KEY_FILE).read_bytes() == before


@pytest.mark.parametrize("role", list(Role))
def test_issue_puts_the_role_in_the_organizational_unit(pki: Pki, role: Role) -> None:
    folder = issue(pki.root, role=role, name=f"issued-{role.value}")
    assert folder == pki.root / role.value / f"issued-{role.value}"
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [u.value for u in units] == [role.value]
    assert role_of(cert) is role
    assert common_name(cert) == f"issued-{role.value}"
    ca = x509.load_pem_x509_certificate((pki.root / CA_FILE).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (folder / CA_FILE).read_bytes() == (pki.root / CA_FILE).read_bytes()


def test_issued_key_is_private_and_matches_the_certificate(pki: Pki, tmp_path: Path) -> None:
    folder = issue(pki.root, role=Role.NODE, name="leeds", out_dir=tmp_path / "id")
    assert folder == tmp_path / "id"
    assert _mode(folder / KEY_FILE) == 0o600
    key = serialization.load_pem_private_key((folder / KEY_FILE).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    assert cert.public_key() == key.public_key()


def test_issue_names_the_hosts_in_the_certificate(pki: Pki, tmp_path: Path) -> None:
    folder = issue(
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
        issue(pki.root, role=Role.NODE, name="sym", out_dir=out)
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
        issue(pki.root, role=Role.NODE, name=name)
    assert sorted(p.relative_to(pki.root) for p in pki.root.rglob("*")) == before
    assert not (pki.root / "x").exists()


@pytest.mark.parametrize(
    "name", ["\u00e9", "nod\u00e9", "x\u00b2", "\u0661\u0662", "\uff46\uff55\uff4c\uff4c"]
)
def test_issue_refuses_non_ascii_names_with_a_config_error(pki: Pki, name: str) -> None:
    # BUG: check_name uses str.isalnum(), which accepts any Unicode letter or digit; such a
    # name then reaches x509.DNSName and fails with cryptography's raw ValueError.
    with pytest.raises(ConfigError, match="not allowed"):
        issue(pki.root, role=Role.NODE, name=name)


def test_issue_accepts_the_allowed_alphabet(pki: Pki, tmp_path: Path) -> None:
    name = "Node_1.region-A" + "x" * 49
    assert len(name) == 64
    folder = issue(pki.root, role=Role.NODE, name=name, out_dir=tmp_path)
    assert load_identity(folder).name == name


# ---- identities -----------------------------------------------------------------------------


def test_load_identity_round_trips(pki: Pki) -> None:
    folder = pki.root / Role.ANALYST.value / "analyst-1"
    identity = load_identity(folder)
    assert identity.name == "analyst-1"
    assert identity.role is Role.ANALYST
    assert identity.cert_pem == (folder / CERT_FILE).read_bytes()
    assert identity.key_pem == (folder / KEY_FILE).read_bytes()
    assert identity.ca_pem == (pki.root / CA_FILE).read_bytes()


@pytest.mark.parametrize("missing", [CERT_FILE, KEY_FILE, CA_FILE])
def test_load_identity_names_the_missing_file(pki: Pki, tmp_path: Path, missing: str) -> None:
    folder = issue(pki.root, role=Role.NODE, name="partial", out_dir=tmp_path / "id")
    (folder / missing).unlink()
    with pytest.raises(ConfigError, match="incomplete") as info:
        load_identity(folder)
    assert missing in str(info.value)
    assert "chc pki issue" in str(info.value)


def test_load_identity_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="incomplete"):
        load_identity(tmp_path / "nowhere")


def test_identity_repr_hides_the_private_key(pki: Pki) -> None:
    for identity in (pki.analyst, pki.node):
        for text in (repr(identity), str(identity), f"{identity}", f"{identity!r}"):
            assert "PRIVATE KEY" not in text
            assert identity.key_pem.decode() not in text
            assert identity.name in text


def test_role_of_and_common_name_refuse_a_certificate_without_them(pki: Pki) -> None:
    ca = x509.load_pem_x509_certificate((pki.root / CA_FILE).read_bytes())
    with pytest.raises(AuthenticationError, match="no chc role"):
        role_of(ca)
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
        common_name(anonymous)
