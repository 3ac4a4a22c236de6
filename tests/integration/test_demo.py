"""`chc demo` end to end, as a newcomer runs it: real processes, a report, a clean shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_json_reports_every_region_and_pathway(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator",
            "demo",
            "--json",
            "--persons",
            "20000",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    payload = json.loads(out.stdout)
    assert set(payload["regions"]) == {"nenc", "nwc", "yh", "gm"}
    views = {q["query"]["view"] for q in payload["queries"]}
    assert len(views) >= 2  # at least two pathways
    for q in payload["queries"]:
        assert not q["partial"]
        assert {n["node"] for n in q["nodes"]} == {"nenc", "nwc", "yh", "gm"}
        assert all(n["status"] == "ok" and n["rho_spent"] > 0 for n in q["nodes"])
        regions = {r["region"] for r in q["rows"]}
        assert regions == {"nenc", "nwc", "yh", "gm", "All regions"}
        for r in q["rows"]:
            if not r["suppressed"]:
                assert r["ci_low"] <= r["estimate"] <= r["ci_high"]
    # The hub logged its clean shutdown (SIGTERM, not a kill).
    logs = sorted((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 5
    assert "stopped" in (tmp_path / "logs" / "hub.log").read_text()
