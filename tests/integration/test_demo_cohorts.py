"""The demo's synthetic nodes answer ad hoc cohorts, and the example it prints works as typed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.local.demo import COHORT_EXAMPLE
from queries.combine import POOLED
from tests.integration._demo_helpers import wait_for_state

pytestmark = pytest.mark.integration


def test_the_printed_cohort_example_answers_on_every_node(tmp_path: Path) -> None:
    home = tmp_path / "home"  # the demo's state file (~/.chc/demo.json) goes here, not in ~
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    demo = [sys.executable, "-m", "coordinator", "demo", "--keep-running", "--persons", "20000"]
    proc = subprocess.Popen(
        [*demo, "--workdir", str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_state(proc, home / ".chc" / "demo.json", timeout_s=180)
        # As an analyst types it: the demo's hub and identity are the defaults while it runs.
        query = ["query", "--sql", COHORT_EXAMPLE, "--rho", "0.05", "--json"]
        done = subprocess.run(
            [sys.executable, "-m", "coordinator", *query],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert done.returncode == 0, done.stderr
    assert COHORT_EXAMPLE in out + err  # the hint shows the query this test ran
    result = json.loads(done.stdout)
    assert {n["node"]: n["status"] for n in result["nodes"]} == {
        "nenc": "ok",
        "nwc": "ok",
        "yh": "ok",
        "gm": "ok",
    }
    pooled = {r["groups"]["sex"]: r for r in result["rows"] if r["region"] == POOLED}
    for sex in ("female", "male"):
        # Thousands of adults with COPD in 80,000 synthetic persons: never a small cell.
        assert not pooled[sex]["suppressed"]
        assert pooled[sex]["estimate"] > 100
