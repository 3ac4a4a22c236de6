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
            # The key's name must survive a crash too: without it the ledger cannot go on.
            _fsync_folder(path.parent)
    _check_private_file(path)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"ledger key {path} is not an Ed25519 private key")
    public = loaded.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub = public_key_path(path)
    # Rewritten if missing or not this key's (e.g. left empty by a disk that failed while
    # it was written): it is derived from the private key, so rewriting it loses nothing.
    if _read_or_empty(pub) != public:
        _write_durably(pub, public)
    return loaded


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _write_durably(path: Path, data: bytes) -> None:
    """Write a file whole or not at all, and durably: temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
