"""Added latency of analyst signing and node-side verification per query, as JSON.

Signing happens once per query at the analyst; verification (certificate chain to the CA,
revocation against the CRL, role, window, ECDSA signature) once per query at every node.
Compared against the same federated query's end-to-end latency measured by
bench/federated_count.py, these are the whole cost of end-to-end authorisation.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.timing import summary, timings
from protocols import revocation
from protocols.security.envelope import sign_query, verify_analyst
from protocols.security.pki import Role, create_ca, issue, load_identity
from queries.spec import Query, canonical_bytes


def main() -> None:
    """Print the JSON figures."""
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp)
        create_ca(pki)
        analyst = load_identity(issue(pki, role=Role.ANALYST, name="a"))
        for i in range(100):  # a CRL with 100 revoked certificates
            issue(pki, role=Role.ANALYST, name=f"old{i}")
            revocation.revoke(pki, f"old{i}")
        crl = revocation.RevocationList(pki / revocation.CRL_FILE, analyst.ca_pem)
        query = canonical_bytes(Query(view="copd", rho=0.1, group_by=("sex", "age_band")))
        signed = sign_query(analyst, query)
        repeats = 2000
        sign = summary(timings(lambda: sign_query(analyst, query), repeats), 4)
        verify = summary(
            timings(
                lambda: verify_analyst(signed, analyst.ca_pem, is_revoked=crl.is_revoked),
                repeats,
            ),
            4,
        )
    print(
        json.dumps(
            {
                "benchmark": "signing",
                "repeats": repeats,
                "sign": sign,
                "verify_with_crl_100": verify,
                "added_per_query_p50_ms": round(sign["p50_ms"] + verify["p50_ms"], 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
