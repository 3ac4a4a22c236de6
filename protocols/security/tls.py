"""Mutual TLS between parties: server credentials, secure channels, the authenticated peer.

This authenticates connections only, with the identities `pki` issues; it is kept apart from
signed envelopes (`envelope`), which authenticate an analyst's query whoever relays it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import grpc
from cryptography import x509

from protocols.security.pki import Identity, Role, common_name, role_of
from protocols.version_metadata import VersionInterceptor, aio_interceptors
from queries.errors import AuthenticationError

# Raise gRPC's 4 MB default deliberately: releases are small, but a grouped table with many
# public keys or a catalog can grow; 64 MB is a ceiling, not an expectation.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Server-side mutual TLS: clients must present a certificate from the federation CA."""
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


@overload
def secure_channel(
    address: str,
    identity: Identity,
    *,
    server_name: str,
    options: Sequence[tuple[str, str | int]] = ...,
    asynchronous: Literal[False] = ...,
) -> grpc.Channel: ...


@overload
def secure_channel(
    address: str,
    identity: Identity,
    *,
    server_name: str,
    options: Sequence[tuple[str, str | int]] = ...,
    asynchronous: Literal[True],
) -> grpc.aio.Channel: ...


def secure_channel(
    address: str,
    identity: Identity,
    *,
    server_name: str,
    options: Sequence[tuple[str, str | int]] = (),
    asynchronous: bool = False,
) -> grpc.Channel | grpc.aio.Channel:
    """A mutual-TLS channel that accepts only a server whose certificate names server_name.

    `options` adds channel options (e.g. protocols.retries' retry policy); `asynchronous`
    makes a grpc.aio channel (for the hub's fan-out), to be made in its event loop.
    """
    creds = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    every = (*GRPC_OPTIONS, ("grpc.ssl_target_name_override", server_name), *options)
    # Every call says which protocol version the caller speaks (protocols/version.py).
    if asynchronous:
        return grpc.aio.secure_channel(
            address, creds, options=every, interceptors=aio_interceptors()
        )
    return grpc.intercept_channel(
        grpc.secure_channel(address, creds, options=every), VersionInterceptor()
    )


@dataclass(frozen=True)
class Peer:
    """The authenticated party at the other end of a mutual-TLS connection."""

    name: str
    role: Role


def peer_of(
    context: grpc.ServicerContext,
    *,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> Peer:
    """Read the caller's identity and role from its verified TLS certificate.

    gRPC has already checked the chain to the CA; revocation is checked here because gRPC's
    Python API does not take a CRL.
    """
    # gRPC returns a list of values per key (grpc-stubs types it as bytes).
    raw: object = context.auth_context().get("x509_pem_cert")
    pem = raw[0] if isinstance(raw, list | tuple) and raw else raw
    if not isinstance(pem, bytes):
        raise AuthenticationError("no client certificate; connect with mutual TLS")
    cert = x509.load_pem_x509_certificate(pem)
    if is_revoked is not None and is_revoked(cert):
        raise AuthenticationError(
            f"the certificate of {common_name(cert)} has been revoked; ask for a new one"
        )
    return Peer(name=common_name(cert), role=role_of(cert))
