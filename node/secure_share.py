"""A node's part in secure aggregation (docs/secure-aggregation.md): round keys and shares.

A pooled_only query runs in two rounds. In round 1 the node plans and prices the query from
public facts alone, sizes its noise shares for the k nodes the envelope names (t of them
assumed honest), and announces a fresh X25519 round key signed with its certified identity
key; nothing is charged and no data is read. In round 2 it checks every node's announcement
itself, charges its ledger, computes its exact integers, adds its share of distributed
discrete Gaussian noise (queries/distributed_noise.py) and masks the vector with the
pairwise masks of protocols/secagg/masks.py, which cancel only in the sum of all k vectors.

A node announces at most once per envelope and masks at most once: the round key is
forgotten as it is used (two vectors masked with one key would differ by the difference of
their values), so a lost round 2 reply is a dropout, never a second masked vector.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519

from node import engine
from protocols import serde
from protocols.secagg import keys
from protocols.security.envelope import SignedQuery
from queries import distributed_noise, mechanisms, plan, spec
from queries.components import Component
from queries.errors import AuthenticationError, ConfigError, PermissionDeniedError, QueryError
from queries.results import MeasureNoise, NoiseInfo, SecureAggregation, ShareNoise

# The most nodes one round may have: pairwise masks cost k - 1 key agreements per node.
MAX_ROUND_NODES = 200
# A round key is forgotten this long after its envelope expires, whatever happens.
_KEY_GRACE_MS = 60_000


class NoRoundKeyError(ConfigError):
    """Round 2 for an envelope this node holds no round key for (never announced, already
    masked, or expired): nothing was charged."""


@dataclass(frozen=True)
class SharePlan:
    """Every component's noise share, fixed from public facts before any data is read."""

    compiled: plan.Plan
    shares: tuple[tuple[Component, distributed_noise.DistributedCalibration], ...]
    guarantee: SecureAggregation
    rho: float  # what the node charges: the query's rho, shared between the components

    def measures(self) -> tuple[MeasureNoise, ...]:
        """The pooled sum's noise per component, in natural units."""
        out = []
        for c, cal in self.shares:
            variance = cal.pooled_variance * c.unit**2
            out.append(
                MeasureNoise(
                    measure=c.key,
                    statistic=c.kind.value,
                    noise=NoiseInfo(
                        mechanism=f"distributed_{mechanisms.MECHANISM}",
                        scale=float(np.sqrt(variance)),
                        variance=variance,
                        sensitivity=c.sensitivity * c.unit,
                    ),
                    rho=cal.target_rho,
                )
            )
        return tuple(out)


def round_nodes(signed: SignedQuery, query: spec.Query, me: str) -> tuple[tuple[str, ...], int]:
    """The round's nodes (the envelope's audience, sorted) and the threshold t, or refuse."""
    if not query.pooled_only:
        raise PermissionDeniedError(
            "secure aggregation is only for pooled_only queries; run this one with Execute"
        )
    nodes = tuple(sorted(set(signed.audience.nodes)))
    if not nodes:
        raise PermissionDeniedError(
            "a pooled_only envelope must name its nodes in its audience (the round must be "
            "exactly those nodes); sign it with every node listed (the Python client and "
            "`chc query --pooled-only` do)"
        )
    if me not in nodes:
        raise PermissionDeniedError(f"the envelope's audience does not name {me} (this node)")
    if len(nodes) < 2:
        raise QueryError(
            "secure aggregation needs at least 2 nodes; with one node its masked vector would "
            "be its own noisy value: run the query without pooled_only"
        )
    if len(nodes) > MAX_ROUND_NODES:
        raise QueryError(
            f"a secure-aggregation round may have at most {MAX_ROUND_NODES} nodes, the "
            f"envelope names {len(nodes)}"
        )
    t = len(nodes) if query.honest_nodes is None else query.honest_nodes
    if t > len(nodes):
        raise QueryError(
            f"honest_nodes is {t} but the envelope names only {len(nodes)} nodes; assume at "
            f"most {len(nodes)} honest"
        )
    return nodes, t


def plan_shares(compiled: plan.Plan, nodes: tuple[str, ...], threshold: int) -> SharePlan:
    """Size every component's share for the round (refuses what the 64-bit ring cannot sum)."""
    rho_of = compiled.rho_shares()
    k = len(nodes)
    shares = []
    for c in compiled.components:
        length = len(compiled.domain) * (c.bins or 1)
        cal = distributed_noise.calibrate_distributed(
            c.sensitivity,
            rho_of[c.key],
            k,
            threshold,
            dimension=max(1, length),
            max_abs_per_node=float(c.max_abs),
        )
        shares.append((c, cal))
    records = tuple(
        ShareNoise(
            component=c.key,
            length=cal.dimension,
            upscale=cal.upscale,
            share_scale=cal.share_scale,
            unit=c.unit,
            rho=cal.target_rho,
            rho_threshold=cal.rho_threshold,
            rho_all_honest=cal.rho_all_honest,
        )
        for c, cal in shares
    )
    guarantee = SecureAggregation(
        nodes=k,
        threshold=threshold,
        # Components are released together: their guarantees add up (zCDP composition).
        rho_threshold=sum(r.rho_threshold for r in records),
        rho_all_honest=sum(r.rho_all_honest for r in records),
        components=records,
        round=nodes,
    )
    return SharePlan(
        compiled=compiled,
        shares=tuple(shares),
        guarantee=guarantee,
        rho=sum(cal.target_rho for _, cal in shares),
    )


def shared_values(share_plan: SharePlan, exact: dict[str, list[int]]) -> list[int]:
    """Every component's exact integers, scaled, plus this node's noise shares, in order."""
    out: list[int] = []
    for c, cal in share_plan.shares:
        values = exact[c.key]
        # A component with no public groups still has one (empty) cell in the calibration.
        out.extend(distributed_noise.add_share(cal, values) if values else ())
    return out


def layout_table(share_plan: SharePlan) -> bytes:
    """The release table without values (Arrow IPC): where the decoded sum goes."""
    compiled = share_plan.compiled
    template = engine.release_template(compiled, tuple(c for c, _ in share_plan.shares))
    return serde.table_to_ipc(template)


class RoundKeys:
    """This node's secret round keys, one per announced envelope, each used at most once."""

    def __init__(self) -> None:
        self._keys: dict[bytes, tuple[int, x25519.X25519PrivateKey | None]] = {}
        self._lock = threading.Lock()

    def new(self, digest: bytes, expires_at_ms: int, now_ms: int) -> x25519.X25519PrivateKey:
        """A fresh key for the envelope with this digest; refused if one was announced."""
        with self._lock:
            self._forget_expired(now_ms)
            if digest in self._keys:
                raise AuthenticationError(
                    "this node has already announced a round key for this envelope (a node "
                    "announces at most once per query); sign the query again for a new round"
                )
            key = keys.new_round_key()
            self._keys[digest] = (expires_at_ms + _KEY_GRACE_MS, key)
            return key

    def peek(self, digest: bytes, now_ms: int) -> x25519.X25519PrivateKey:
        """The envelope's round key, still held; refused if there is none."""
        with self._lock:
            self._forget_expired(now_ms)
            found = self._keys.get(digest)
        if found is None or found[1] is None:
            raise NoRoundKeyError(
                "this node holds no round key for this envelope: it never announced one, or "
                "it has already sent its masked share (a node masks at most once), or the "
                "envelope expired; nothing was charged for this call: sign the query again"
            )
        return found[1]

    def forget(self, digest: bytes) -> None:
        """Drop the envelope's key for good (it stays known, so it is never announced again)."""
        with self._lock:
            found = self._keys.get(digest)
            if found is not None:
                self._keys[digest] = (found[0], None)

    def _forget_expired(self, now_ms: int) -> None:
        gone = [d for d, (until, _) in self._keys.items() if until <= now_ms]
        for d in gone:
            del self._keys[d]
