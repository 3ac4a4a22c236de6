"""Pairwise masks (round 2): each node's vector, masked so that only the sum is revealed.

This is the pairwise masking of Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS): nodes i < j agree on a seed by X25519 and expand
it to a mask m_ij; i adds it and j subtracts it, so the masks cancel in the sum modulo 2^64
and each single masked vector is uniformly distributed to anyone without the seeds.

Seeds: seed_ij = HKDF-SHA256(X25519(sk_i, pk_j), salt = the query digest, info = b"chc secagg
v1" + both names, sorted and length-prefixed + the vector length), 44 bytes: a ChaCha20 key
(32) and nonce (12, block counter from 0). The mask is the ChaCha20 keystream read as n
little-endian uint64. Binding the digest, the pair and the length means a mask is never
reused across queries, pairs or shapes.

Not done, on purpose: Bonawitz et al.'s double masking (a self mask per node) and the
Shamir-shared recovery of a dropped node's seeds. Those let the server finish a round when
nodes drop out, at the cost of two more rounds and of every node holding secret shares of
the others' seeds and self masks (and refusing to reveal both kinds for any one node). Our
federations have tens of nodes on servers, not millions of phones, so a dropout is rare and
rerunning is cheap: a node that fails after masking makes the sum unusable, the hub aborts
and names it, and a rerun without it is a new query (docs/secure-aggregation.md). Without
double masking, a node's masked vector must be sent once, with one round key: never mask
twice with one key.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.secagg import ring
from protocols.secagg.keys import DIGEST_BYTES, VerifiedAnnouncement, public_bytes
from queries.errors import AuthenticationError, QueryError

INFO_PREFIX = b"chc secagg v1"
_KEY_BYTES, _NONCE_BYTES = 32, 12


def _info(a: str, b: str, length: int) -> bytes:
    """HKDF info: the prefix, both names (sorted, each length-prefixed) and the length."""
    low, high = sorted((a, b))
    parts = [INFO_PREFIX]
    for name in (low, high):
        raw = name.encode()
        parts.append(len(raw).to_bytes(2, "big") + raw)
    parts.append(length.to_bytes(8, "big"))
    return b"".join(parts)


def pair_mask(
    my_private_key: x25519.X25519PrivateKey,
    me: str,
    other: VerifiedAnnouncement,
    digest: bytes,
    length: int,
) -> ring.RingVector:
    """The mask m_ij that me and other both derive (identical on both sides)."""
    try:
        shared = my_private_key.exchange(other.public_key)
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise AuthenticationError(
            f"node {other.name!r}'s round key is not a usable X25519 key"
        ) from exc
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=_KEY_BYTES + _NONCE_BYTES,
        salt=digest,
        info=_info(me, other.name, length),
    ).derive(shared)
    key, nonce = material[:_KEY_BYTES], material[_KEY_BYTES:]
    # cryptography's ChaCha20 takes a 16-byte nonce: the 4-byte block counter, then the nonce.
    cipher = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), mode=None)
    stream = cipher.encryptor().update(bytes(8 * length))
    mask: ring.RingVector = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return mask


def round_names(
    me: str,
    announcements: Sequence[VerifiedAnnouncement],
    my_public_key: bytes,
    digest: bytes,
    expected_nodes: Collection[str] | None = None,
) -> list[str]:
    """The round's node names, sorted, after checking the announcements belong together."""
    seen: set[str] = set()
    for ann in announcements:
        if ann.name in seen:
            raise AuthenticationError(f"node {ann.name!r} was announced twice in this round")
        seen.add(ann.name)
        if ann.query_digest != digest:
            raise AuthenticationError(f"node {ann.name!r}'s announcement is for another query")
        if ann.name == me and ann.public_key_bytes != my_public_key:
            raise AuthenticationError(
                f"the round lists a key for {me!r} (this node) that is not this node's round key"
            )
    names = sorted(seen | {me})
    if expected_nodes is not None and set(expected_nodes) != set(names):
        missing = sorted(set(expected_nodes) - set(names))
        extra = sorted(set(names) - set(expected_nodes))
        raise AuthenticationError(
            f"the round's nodes are not the query's: missing {missing}, unexpected {extra}"
        )
    if len(names) < 2:
        raise QueryError(
            "secure aggregation needs at least 2 nodes; with one node its masked vector "
            "would be its own noisy value"
        )
    return names


def masked(
    values: Sequence[int],
    me: str,
    announcements: Sequence[VerifiedAnnouncement],
    my_private_key: x25519.X25519PrivateKey,
    digest: bytes,
    *,
    expected_nodes: Collection[str] | None = None,
) -> ring.RingVector:
    """This node's values (exact plus its noise share) masked for the round.

    announcements are the round's verified announcements (verify_announcement), this node's
    own optional; expected_nodes, when given, are the nodes the query names, and the round
    must be exactly those (a hub may not leave honest nodes out). For every other node j the
    pair mask is added if me < j and subtracted if me > j (names in sorted order).
    """
    if len(digest) != DIGEST_BYTES:
        raise QueryError(f"the query digest must be {DIGEST_BYTES} bytes, got {len(digest)}")
    mine = public_bytes(my_private_key.public_key())
    names = round_names(me, announcements, mine, digest, expected_nodes)
    by_name = {a.name: a for a in announcements}
    vector = ring.encode(values)
    for name in names:
        if name == me:
            continue
        mask = pair_mask(my_private_key, me, by_name[name], digest, len(vector))
        vector = ring.add(vector, mask) if me < name else ring.subtract(vector, mask)
    return vector


def unmask_sum(vectors: Sequence[ring.RingVector]) -> list[int]:
    """The hub's only view: the sum of every node's masked vector, decoded.

    The masks cancel only when every node of the round is summed; with one missing the
    result is uniformly random, so the hub must abort a round with a missing vector.
    """
    return ring.decode(ring.total(vectors))
