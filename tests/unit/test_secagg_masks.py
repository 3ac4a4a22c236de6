"""Secure aggregation's core: signed round keys, pairwise masks in Z_2^64, and the ring.

Real keys throughout: a federation CA issues the node certificates, every node makes a fresh
X25519 key, signs its announcement, and verifies the others' before masking.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from scipy.stats import chi2

from protocols.secagg import ring
from protocols.secagg.keys import (
    Announcement,
    VerifiedAnnouncement,
    announce,
    new_round_key,
    public_bytes,
    query_digest,
    signed_payload,
    verify_announcement,
)
from protocols.secagg.masks import masked, unmask_sum
from protocols.security.pki import Identity, Role, create_ca, issue, load_identity
from queries.errors import AuthenticationError, QueryError

DIGEST = query_digest(b"a signed query envelope")
OTHER_DIGEST = query_digest(b"another query's envelope")
MAX_NODES = 16


@dataclasses.dataclass(frozen=True)
class Federation:
    """A CA with 16 nodes and an analyst, and a second CA with a node of the same name."""

    ca_pem: bytes
    nodes: tuple[Identity, ...]
    analyst: Identity
    stranger: Identity  # node-00 certified by another CA


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca(root)
    nodes = tuple(
        load_identity(issue(root, role=Role.NODE, name=f"node-{i:02d}")) for i in range(MAX_NODES)
    )
    analyst = load_identity(issue(root, role=Role.ANALYST, name="analyst-1"))
    other: Path = tmp_path_factory.mktemp("other-pki")
    create_ca(other)
    stranger = load_identity(issue(other, role=Role.NODE, name="node-00"))
    return Federation(ca.read_bytes(), nodes, analyst, stranger)


def _round(
    fed: Federation, values: list[list[int]], digest: bytes = DIGEST
) -> list[ring.RingVector]:
    """Run rounds 1 and 2 for len(values) nodes: announce, verify the others, mask."""
    ids = fed.nodes[: len(values)]
    keys = [new_round_key() for _ in ids]
    announcements = [announce(i, k, digest) for i, k in zip(ids, keys, strict=True)]
    out = []
    for me, key, vals in zip(ids, keys, values, strict=True):
        verified = [
            verify_announcement(a, fed.ca_pem, digest, expected_name=a.name)
            for a in announcements
            if a.name != me.name
        ]
        names = [i.name for i in ids]
        out.append(masked(vals, me.name, verified, key, digest, expected_nodes=names))
    return out


@pytest.mark.parametrize("k", [2, 3, 4, 16])
def test_masks_cancel_exactly(fed: Federation, k: int) -> None:
    """Random int64 values whose sum fits the ring come back exactly, and only as a sum."""
    rng = random.Random(k)  # test data, not privacy noise
    n = 64
    bound = (2**63 - 1) // k
    values = [[rng.randint(-bound, bound) for _ in range(n)] for _ in range(k)]
    vectors = _round(fed, values)
    assert unmask_sum(vectors) == [sum(col) for col in zip(*values, strict=True)]
    for vals, vec in zip(values, vectors, strict=True):
        assert ring.decode(vec) != vals  # no node's vector is sent in the clear
    # Without one node's vector the masks do not cancel (each cell matches by chance 2^-64).
    partial = unmask_sum(vectors[1:])
    assert partial != [sum(col) for col in zip(*values[1:], strict=True)]


def test_a_round_of_one_length_only(fed: Federation) -> None:
    vectors = _round(fed, [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(QueryError, match="same number of components"):
        unmask_sum([vectors[0], vectors[1][:2]])


def _histogram_statistic(samples: np.ndarray) -> float:
    """Pearson's chi-square of byte values against the uniform distribution on 256 bins."""
    counts = np.bincount(samples.astype(np.int64), minlength=256)
    expected = len(samples) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_single_masked_vector_is_uniform(fed: Federation) -> None:
    """The hub's view of one node: over 200 rounds with the SAME input, its bytes are uniform.

    Node 0 of 3 masks the same 256 values (a constant and a few large ones) in 200 fresh
    rounds; the low byte and the top byte of its 51,200 masked values are each tested for
    uniformity over 256 bins by Pearson's chi-square (255 degrees of freedom, expected count
    200 per bin, where the chi-square approximation is excellent). Each threshold is the
    chi-square quantile of 1 - 5e-7 (about 381), so the test fails by chance with probability
    below 2 * 5e-7 = 1e-6. The same statistic on the unmasked values is checked to be far
    above the threshold, so the test can fail.
    """
    rounds, n = 200, 256
    same = [7] * (n - 3) + [2**40, -(2**40), 123_456_789]
    threshold = float(chi2.isf(5e-7, 255))
    seen = [_round(fed, [same, [0] * n, [1] * n])[0] for _ in range(rounds)]
    views = np.concatenate(seen)
    low, top = views & np.uint64(0xFF), views >> np.uint64(56)
    assert _histogram_statistic(low) < threshold
    assert _histogram_statistic(top) < threshold
    clear = np.tile(ring.encode(same), rounds)
    assert _histogram_statistic(clear & np.uint64(0xFF)) > 100 * threshold


def _hand_announcement(
    identity: Identity, *, name: str | None = None, digest: bytes = DIGEST
) -> Announcement:
    """An announcement signed with identity's key over these fields, whatever its role."""
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = public_bytes(new_round_key().public_key())
    named = identity.name if name is None else name
    payload = signed_payload(name=named, public_key=public, query_digest=digest)
    return Announcement(
        name=named,
        public_key=public,
        query_digest=digest,
        certificate=identity.cert_pem,
        signature=key.sign(payload, ec.ECDSA(hashes.SHA256())),
    )


def test_a_good_announcement_verifies(fed: Federation) -> None:
    key = new_round_key()
    ann = announce(fed.nodes[1], key, DIGEST)
    got = verify_announcement(ann, fed.ca_pem, DIGEST, expected_name="node-01")
    assert got.name == "node-01"
    assert got.public_key_bytes == public_bytes(key.public_key())
    assert got.query_digest == DIGEST


def _flip_signature(ann: Announcement) -> Announcement:
    sig = bytearray(ann.signature)
    sig[len(sig) // 2] ^= 0x01
    return dataclasses.replace(ann, signature=bytes(sig))


def test_announcements_that_do_not_verify_are_refused(fed: Federation) -> None:
    node = fed.nodes[1]
    good = announce(node, new_round_key(), DIGEST)
    cases: list[tuple[Announcement, str | None, str]] = [
        (good, None, "for another query"),  # verified against OTHER_DIGEST below
        (good, "node-02", "relayed as node 'node-02'"),
        (_hand_announcement(node, name="node-02"), None, "does not match its certificate"),
        (_hand_announcement(fed.analyst), None, "role analyst, not node"),
        (_hand_announcement(fed.stranger), None, "not issued by this federation's CA"),
        (_flip_signature(good), None, "signature does not match"),
        # A hub substituting its own key: the node's signature no longer covers it.
        (
            dataclasses.replace(good, public_key=public_bytes(new_round_key().public_key())),
            None,
            "signature does not match",
        ),
        (dataclasses.replace(good, signature_algorithm="ed25519"), None, "unsupported"),
        (dataclasses.replace(good, certificate=b"not a pem"), None, "not valid PEM"),
    ]
    for i, (ann, expected_name, problem) in enumerate(cases):
        digest = OTHER_DIGEST if i == 0 else DIGEST
        with pytest.raises(AuthenticationError, match=problem):
            verify_announcement(ann, fed.ca_pem, digest, expected_name=expected_name)


def test_only_nodes_announce(fed: Federation) -> None:
    with pytest.raises(AuthenticationError, match="only nodes announce"):
        announce(fed.analyst, new_round_key(), DIGEST)


def _verified(
    name: str, key: x25519.X25519PrivateKey, digest: bytes = DIGEST
) -> VerifiedAnnouncement:
    return VerifiedAnnouncement(name=name, public_key=key.public_key(), query_digest=digest)


def test_a_round_that_does_not_add_up_is_refused() -> None:
    """Duplicates, another query's key, a key put in for this node, missing or extra nodes."""
    mine, a, b = new_round_key(), new_round_key(), new_round_key()
    va, vb = _verified("node-a", a), _verified("node-b", b)
    with pytest.raises(AuthenticationError, match="announced twice"):
        masked([1], "node-m", [va, va], mine, DIGEST)
    with pytest.raises(AuthenticationError, match="another query"):
        masked([1], "node-m", [va, _verified("node-b", b, OTHER_DIGEST)], mine, DIGEST)
    with pytest.raises(AuthenticationError, match="not this node's round key"):
        masked([1], "node-m", [va, _verified("node-m", b)], mine, DIGEST)
    with pytest.raises(AuthenticationError, match=r"missing \['node-c'\]"):
        masked([1], "node-m", [va, vb], mine, DIGEST, expected_nodes=["node-a", "node-c"])
    with pytest.raises(QueryError, match="at least 2 nodes"):
        masked([1], "node-m", [], mine, DIGEST)
    # This node's own announcement, with its own key, is accepted in the round.
    assert len(masked([1], "node-m", [va, _verified("node-m", mine)], mine, DIGEST)) == 1


def test_ring_encodes_twos_complement_and_wraps() -> None:
    extremes = [0, 1, -1, 2**63 - 1, -(2**63)]
    assert ring.decode(ring.encode(extremes)) == extremes
    assert ring.encode([-1])[0] == np.uint64(2**64 - 1)
    top = ring.encode([2**63 - 1])
    assert ring.decode(ring.add(top, ring.encode([1]))) == [-(2**63)]  # wraps, silently
    assert ring.decode(ring.subtract(ring.encode([-(2**63)]), ring.encode([1]))) == [2**63 - 1]
    with pytest.raises(QueryError, match="outside the 64-bit range"):
        ring.encode([2**63])


def test_ring_fits_only_sums_that_cannot_wrap() -> None:
    """k (bound + 40 sigma) must stay under 2^62: just under fits, just over does not."""
    limit = 2**62
    assert ring.fits(limit / 16 * 0.999, 16)
    assert not ring.fits(limit / 16 * 1.001, 16)
    assert ring.fits(1000, 16, share_scale=1e10)
    assert not ring.fits(1000, 16, share_scale=limit / 16 / 40 * 1.001)
    assert not ring.fits(float("inf"), 2)
