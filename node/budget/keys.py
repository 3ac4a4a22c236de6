"""The node's ledger signing key: created once, private to the node's user, never a symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.ledger.entry import public_key_path
from queries.errors import ConfigError


def _check_private_file(path: Path) -> None:
    if path.is_symlink():
        raise ConfigError(f"ledger key {path} is a symbolic link; refusing to use it")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(f"ledger key {path} is not a regular file")
    if mode & 0o077:
        raise ConfigError(
            f"ledger key {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The node's Ed25519 ledger key: created (0600, never through a symlink) if missing."""
    if path.is_symlink():
        raise ConfigError(f"ledger key {path} is a symbolic link; refusing to use it")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
    _check_private_file(path)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"ledger key {path} is not an Ed25519 private key")
    pub = public_key_path(path)
    if not pub.exists():
        pub.write_bytes(
            loaded.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return loaded
