"""The ledger key files: the private key is kept, the public half is always the key's own.

A disk that fails while `.pub` is written can leave it empty (seen in the read-only disk
fault test); since it is derived from the private key, the node rewrites it at start-up.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from node.budget.keys import load_or_create_key
from protocols.ledger.entry import public_key_path


def _public_pem(path: Path) -> bytes:
    key = load_or_create_key(path)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_new_key_is_private_and_its_public_half_is_written(tmp_path: Path) -> None:
    path = tmp_path / "node.ledger.key"
    expected = _public_pem(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_path(path).read_bytes() == expected
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_an_empty_or_wrong_public_file_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "node.ledger.key"
    expected = _public_pem(path)
    pub = public_key_path(path)
    for damaged in (b"", b"-----BEGIN PUBLIC KEY-----\ntruncated"):
        pub.write_bytes(damaged)
        assert _public_pem(path) == expected  # the same private key, reloaded
        assert pub.read_bytes() == expected
