"""20 concurrent analysts through one hub: no unexpected error, budgets exact to the ledgers.

Runs bench/load.py's load at QUERIES per analyst, chosen so that the test takes under three
minutes in CI on a 2-core machine (about 35 queries a second through four nodes here);
`python -m bench.load` runs the full 20 x 500 and prints the same figures as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.load import TIGHT, run_load

pytestmark = [pytest.mark.load, pytest.mark.integration]

ANALYSTS = 20
QUERIES = 100


def test_twenty_analysts_budgets_exact_to_the_ledgers(tmp_path: Path) -> None:
    report = run_load(tmp_path, analysts=ANALYSTS, queries=QUERIES)
    summary = {k: v for k, v in asdict(report).items() if k != "told"}
    print(json.dumps(summary))  # p50/p99 latency and throughput, shown with -s
    assert report.queries == ANALYSTS * QUERIES
    assert report.errors == {}, report.error_examples
    # Both kinds of expected refusal happened: over the per-query cap, and analysts who ran
    # out of their own cap (each of the TIGHT analysts does, after about 15 queries).
    assert report.expected_refusals.get("over_query_cap") == ANALYSTS * QUERIES // 10
    assert report.expected_refusals.get("analyst_cap", 0) >= TIGHT
    assert report.released == report.queries - sum(report.expected_refusals.values())
    # Told by the hub == released in each node's ledger == reported by the node, per analyst.
    assert report.budget_mismatches == []
    assert report.ledgers_verified, report.ledger_anomalies
    assert len(report.told) == ANALYSTS
    assert report.p50_ms > 0
    assert report.p99_ms >= report.p50_ms
