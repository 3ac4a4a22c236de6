"""A SuperNode's key pair: how Flower's SuperLink authenticates a node (OpenSSH ECDSA P-256).

Shared by the node (its SuperNode signs with the private key) and the local federation,
which registers the public key with the hub's SuperLink before the node starts.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.flower_process import write_private

SUPERNODE_KEY = "supernode_key"


def make_supernode_key(folder: Path) -> tuple[Path, Path]:
    """The node's SuperNode key pair (OpenSSH ECDSA P-256) in folder, created if missing.

    Returns (private key, public key); the hub registers the public one with its SuperLink.
    """
    private, public = folder / SUPERNODE_KEY, folder / f"{SUPERNODE_KEY}.pub"
    if private.is_file() and public.is_file():
        return private, public
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public
