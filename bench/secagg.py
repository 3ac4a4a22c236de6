"""Added latency of secure aggregation per query, at 4 and 16 nodes, as JSON.

For a vector of 2,250 components (a grouped query's size at one node: bench/query_engine.py's
six statistics over sex x IMD quintile, histogram bins included), the per-node cost of secure
aggregation is: make a fresh X25519 round key and sign its announcement (round 1), verify
the other k - 1 nodes' announcements (chain to the CA, role, name, digest, ECDSA signature),
and build the masked vector (k - 1 key agreements, HKDF, ChaCha20 masks); the hub's cost is
summing the k masked vectors and decoding. Both are compared with the node's time to add
its OpenDP noise share to the same vector, in the same run. Network round trips are not
included: round 1 adds one hub round trip per query (~0.5 ms on loopback, DESIGN facts).

Run: .venv/bin/python -m bench.secagg [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench.timing import summary, timings
from protocols.secagg.keys import announce, new_round_key, query_digest, verify_announcement
from protocols.secagg.masks import masked, unmask_sum
from protocols.security.pki import Role, create_ca, issue, load_identity
from queries import distributed_noise

COMPONENTS = 2_250
RHO = 0.1


def _bench_k(pki: Path, ca_pem: bytes, k: int, repeats: int) -> dict[str, object]:
    ids = [load_identity(pki / "node" / f"node-{i:02d}") for i in range(k)]
    digest = query_digest(b"bench envelope %d" % k)
    # The exact values are test data, not noise.
    exact = [int(v) for v in np.random.default_rng(k).integers(0, 10_000, COMPONENTS)]
    cal = distributed_noise.calibrate_distributed(
        1.0, RHO, k, k, dimension=COMPONENTS, max_abs_per_node=10_000
    )
    keys = [new_round_key() for _ in ids]
    anns = [announce(i, key, digest) for i, key in zip(ids, keys, strict=True)]
    me, others = ids[0], anns[1:]
    names = [i.name for i in ids]

    def keys_and_sign() -> object:
        return announce(me, new_round_key(), digest)

    def verify_others() -> object:
        return [verify_announcement(a, ca_pem, digest, expected_name=a.name) for a in others]

    verified = [verify_announcement(a, ca_pem, digest, expected_name=a.name) for a in others]

    def mask() -> object:
        return masked(exact, me.name, verified, keys[0], digest, expected_nodes=names)

    def noise() -> object:
        return distributed_noise.add_share(cal, exact)

    vectors = []
    for i, key in enumerate(keys):
        mine = [verify_announcement(a, ca_pem, digest) for j, a in enumerate(anns) if j != i]
        vectors.append(masked(exact, ids[i].name, mine, key, digest, expected_nodes=names))
    if unmask_sum(vectors) != [k * v for v in exact]:
        raise RuntimeError("the masks did not cancel: the benchmark would time a broken round")

    def hub() -> object:
        return unmask_sum(vectors)

    parts = {
        "keys_and_sign": summary(timings(keys_and_sign, repeats)),
        "verify_k_minus_1_announcements": summary(timings(verify_others, repeats)),
        "masked_vector": summary(timings(mask, repeats)),
        "hub_unmask_sum": summary(timings(hub, repeats)),
        "node_opendp_noise_same_vector": summary(timings(noise, repeats)),
    }
    node_ms = sum(
        parts[p]["p50_ms"]
        for p in ("keys_and_sign", "verify_k_minus_1_announcements", "masked_vector")
    )
    return {
        "nodes": k,
        "components": COMPONENTS,
        "upscale": cal.upscale,
        **parts,
        "node_secagg_total_p50_ms": round(node_ms, 3),
        "node_secagg_over_noise_p50": round(
            node_ms / parts["node_opendp_noise_same_vector"]["p50_ms"], 2
        ),
    }


def main() -> None:
    """Print the JSON figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chc-bench-secagg-") as tmp:
        pki = Path(tmp)
        ca_pem = create_ca(pki).read_bytes()
        for i in range(16):
            issue(pki, role=Role.NODE, name=f"node-{i:02d}")
        results = [_bench_k(pki, ca_pem, k, args.repeats) for k in (4, 16)]
    print(json.dumps({"secure_aggregation": results}, indent=2))


if __name__ == "__main__":
    main()
