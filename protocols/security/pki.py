"""The federation PKI: the CA, issuing certificates (and their record), loading identities.

TLS uses ECDSA P-256 certificates because gRPC's TLS stack rejects Ed25519 leaves. A
certificate's role (node, hub, analyst, auditor) is its subject's organizational unit, so the
role travels with the identity and every server reads it from the verified peer certificate.
This is kept apart from mutual TLS (`tls`) and signed envelopes (`envelope`), which both use
the identities it issues: `chc pki` and the revocation list need nothing else.
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from queries.errors import AuthenticationError, ConfigError

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"


class Role(enum.StrEnum):
    """What a certificate holder may do in the federation."""

    NODE = "node"
    HUB = "hub"
    ANALYST = "analyst"
    AUDITOR = "auditor"


@dataclass(frozen=True)
class Identity:
    """A party's certificate, private key and the federation CA, as PEM bytes."""

    name: str
    role: Role
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:  # never print the private key
        return f"Identity(name={self.name!r}, role={self.role.value!r})"


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600), refusing to follow a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; refusing to write a private key there")
    # O_NOFOLLOW closes the gap between the check above and the open.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(pki_dir: Path, *, common_name: str = "chc federation CA", days: int = 3650) -> Path:
    """Create a federation CA (ECDSA P-256) in pki_dir; refuse to overwrite an existing one."""
    cert_path, key_path = pki_dir / CA_FILE, pki_dir / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        raise ConfigError(f"a CA already exists in {pki_dir}; use another folder or remove it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pki_dir.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def check_name(name: str) -> None:
    """Refuse a name that is not safe as a certificate name and a folder name."""
    if (
        not name
        or len(name) > 64
        or not all((c.isascii() and c.isalnum()) or c in "-_." for c in name)
    ):
        raise ConfigError(
            f"identity name {name!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.'"
        )
    if name.startswith("."):
        raise ConfigError(f"identity name {name!r} may not start with '.'")


def issue(
    pki_dir: Path,
    *,
    role: Role,
    name: str,
    out_dir: Path | None = None,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 365,
    organisation: str | None = None,
) -> Path:
    """Issue an ECDSA P-256 certificate for name with role; returns its identity folder.

    The folder holds cert.pem, key.pem (0600) and a copy of the CA certificate, which is all a
    party needs. Servers get the name and hosts as subject alternative names.
    """
    check_name(name)
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
    ]
    if organisation:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    cert, key, ca_pem = _sign_leaf(
        pki_dir,
        subject=x509.Name(attributes),
        sans=[x509.DNSName(name), *_host_names(hosts)],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )
    folder = out_dir if out_dir is not None else pki_dir / role.value / name
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(folder / KEY_FILE, _key_pem(key))
    (folder / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / CA_FILE).write_bytes(ca_pem)
    _record_issued(pki_dir, name=name, role=role, cert=cert, folder=folder)
    return folder


def issue_server_certificate(
    pki_dir: Path,
    *,
    name: str,
    out_dir: Path,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 30,
) -> Path:
    """Issue a TLS server certificate for a helper service (e.g. Flower's SuperLink).

    Unlike issue(), it carries no chc role and is valid for server authentication only, so
    its key, which the helper process reads, can never pass as a hub or node identity. The
    hosts (names or IP addresses) are its subject alternative names; returns out_dir, which
    holds cert.pem, key.pem (0600) and the CA certificate.
    """
    check_name(name)
    cert, key, ca_pem = _sign_leaf(
        pki_dir,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
        sans=_host_names(hosts),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        days=days,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(out_dir / KEY_FILE, _key_pem(key))
    (out_dir / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out_dir / CA_FILE).write_bytes(ca_pem)
    return out_dir


def _host_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    """Subject alternative names for hosts: an IP address where it parses as one."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _sign_leaf(
    pki_dir: Path,
    *,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    """A new ECDSA P-256 key and its certificate signed by the CA in pki_dir."""
    ca_key_pem = (pki_dir / CA_KEY_FILE).read_bytes()
    ca_pem = (pki_dir / CA_FILE).read_bytes()
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{pki_dir / CA_KEY_FILE} is not an ECDSA key")
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key, ca_pem


ISSUED_FILE = "issued.json"


def _record_issued(
    pki_dir: Path, *, name: str, role: Role, cert: x509.Certificate, folder: Path
) -> None:
    """Keep an index of issued certificates so that `chc pki revoke NAME` finds them."""
    index_path = pki_dir / ISSUED_FILE
    # An exclusive lock so that two concurrent `chc pki issue` runs cannot lose an entry.
    with (pki_dir / ".issued.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = json.loads(index_path.read_text()) if index_path.exists() else []
        _append_issued(index, name=name, role=role, cert=cert, folder=folder)
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(index_path)


def _append_issued(
    index: list[dict[str, str]], *, name: str, role: Role, cert: x509.Certificate, folder: Path
) -> None:
    index.append(
        {
            "name": name,
            "role": role.value,
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "folder": str(folder),
        }
    )


def organisation_of(cert: x509.Certificate) -> str:
    """The certificate's organisation (empty if none), used by node access policies."""
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(names[0].value) if names else ""


def role_of(cert: x509.Certificate) -> Role:
    """The role carried in a certificate's organizational unit."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    values = {str(u.value) for u in units}
    for role in Role:
        if role.value in values:
            return role
    raise AuthenticationError(
        "the certificate carries no chc role; ask the federation to reissue it"
    )


def common_name(cert: x509.Certificate) -> str:
    """The certificate's common name, the party's identity in the federation."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise AuthenticationError("the certificate has no common name")
    return str(names[0].value)


def load_identity(folder: Path) -> Identity:
    """Load an identity folder written by issue(), with a clear error if anything is missing."""
    paths = {f: folder / f for f in (CERT_FILE, KEY_FILE, CA_FILE)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"identity folder {folder} is incomplete (missing {', '.join(missing)}); "
            "create it with `chc pki issue`"
        )
    cert_pem = paths[CERT_FILE].read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    return Identity(
        name=common_name(cert),
        role=role_of(cert),
        cert_pem=cert_pem,
        key_pem=paths[KEY_FILE].read_bytes(),
        ca_pem=paths[CA_FILE].read_bytes(),
    )
