"""Certificate revocation: a CRL signed by the federation CA, written by `chc pki revoke`,
loaded by nodes and the hub and re-read when the file changes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.security.pki import CA_FILE, CA_KEY_FILE, ISSUED_FILE
from queries.errors import ConfigError

log = logging.getLogger(__name__)

CRL_FILE = "crl.pem"
REVOKED_FILE = "revoked.json"
# How long a CRL is valid before the CA must publish a new one.
CRL_VALIDITY = dt.timedelta(days=30)


def revoke(pki_dir: Path, name: str, *, reason: str = "unspecified") -> list[str]:
    """Revoke every certificate issued to name and rewrite the CRL; returns the serials."""
    index_path = pki_dir / ISSUED_FILE
    if not index_path.exists():
        raise ConfigError(f"{pki_dir} has no {ISSUED_FILE}; is it the federation's PKI folder?")
    issued = json.loads(index_path.read_text())
    serials = [e["serial"] for e in issued if e["name"] == name]
    if not serials:
        known = sorted({e["name"] for e in issued})
        raise ConfigError(f"no certificate was issued to {name!r}; issued: {known}")
    revoked_path = pki_dir / REVOKED_FILE
    revoked = json.loads(revoked_path.read_text()) if revoked_path.exists() else []
    already = {r["serial"] for r in revoked}
    now = dt.datetime.now(dt.UTC).isoformat()
    revoked += [
        {"serial": s, "name": name, "reason": reason, "revoked_at": now}
        for s in serials
        if s not in already
    ]
    revoked_path.write_text(json.dumps(revoked, indent=2))
    write_crl(pki_dir)
    return serials


def write_crl(pki_dir: Path) -> Path:
    """Sign and write the CRL for everything in revoked.json (an empty CRL if nothing)."""
    ca_cert = x509.load_pem_x509_certificate((pki_dir / CA_FILE).read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / CA_KEY_FILE).read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an ECDSA key")
    revoked_path = pki_dir / REVOKED_FILE
    revoked = json.loads(revoked_path.read_text()) if revoked_path.exists() else []
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + CRL_VALIDITY)
    )
    for r in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(r["serial"], 16))
            .revocation_date(dt.datetime.fromisoformat(r["revoked_at"]))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path = pki_dir / CRL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)
    return path


class RevocationList:
    """Revoked serials from a CRL file, verified against the CA and re-read when it changes.

    A missing file means nothing is revoked; a file that fails verification is an error at
    start-up and, later, keeps the last good list (and is logged), so a corrupted copy can
    never un-revoke anyone.
    """

    def __init__(self, path: Path | None, ca_pem: bytes, *, recheck_s: float = 2.0) -> None:
        self.path = path
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._serials: frozenset[int] = frozenset()
        self._mtime: float | None = None
        self._checked = 0.0
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._load(initial=True)

    def _load(self, *, initial: bool = False) -> None:
        if self.path is None or not self.path.exists():
            return
        mtime = self.path.stat().st_mtime
        if mtime == self._mtime:
            return
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
            public_key = self._ca.public_key()
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or not (
                crl.is_signature_valid(public_key)
            ):
                raise ValueError("the CRL is not signed by the federation CA")
        except ValueError as exc:
            if initial:
                raise ConfigError(f"cannot use CRL {self.path}: {exc}") from None
            log.error(
                "ignoring an invalid CRL at %s (keeping the last good one): %s", self.path, exc
            )
            self._mtime = mtime
            return
        self._serials = frozenset(r.serial_number for r in crl)
        self._mtime = mtime
        log.info("loaded CRL %s: %d revoked certificate(s)", self.path, len(self._serials))

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """True if the certificate's serial is on the current CRL."""
        now = time.monotonic()
        if now - self._checked > self._recheck_s:
            with self._lock:
                self._checked = now
                self._load()
        return cert.serial_number in self._serials
