"""`chc demo --node NAME=node.toml` serves the custodian's configuration as it is.

One demo run (real `chc demo`, node and hub processes, mTLS on loopback) over a custodian's
folder whose node.toml sets its own reference date, budget, pathway folder, ledger and
opt-out register, all with paths relative to the file. The tests read back what the node
serves (Describe through the hub), what the demo asked, and the custodian's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, fields
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from node.config import load_config
from queries.results import NodeDescription
from tests.integration._demo_helpers import wait_for_state

pytestmark = pytest.mark.integration

PERSONS = 10_000
REFERENCE = date(2024, 6, 30)
TOTAL_RHO = 3.5
MAX_RHO = 0.5
DEMO_RHO = 0.05

PATHWAY = """\
name: breathless_adults
title: Breathless adults (the custodian's own pathway)
conditions: [255573]
entry: condition
age_min: 40
age_max: 120
window_days: 180
"""

# Every path relative to this file's folder, as `chc-node init` and custodians write them.
NODE_TOML = f"""\
name = "nwc"
omop = "omop"
identity = "identity"
listen = "0.0.0.0:50051"
reference_date = {REFERENCE.isoformat()}
pathways = ["breathless_adults"]
pathways_dir = "pathways"
imd_lookup = "omop/{synth.LOOKUP_FILE}"
ledger = "ledger/nwc.ledger.sqlite"   # the custodian's real ledger: the demo must not touch it

[budget]
total_rho = {TOTAL_RHO}
max_rho_per_query = {MAX_RHO}

[release]
suppress_below = 10

[consent]
registers = ["optouts.csv"]
"""


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under folder: size, modification time and content hash."""
    out: dict[str, tuple[int, int, str]] = {}
    for path in sorted(folder.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, digest)
    return out


@dataclass(frozen=True)
class DemoRun:
    custodian: Path
    workdir: Path
    before: dict[str, tuple[int, int, str]]
    after: dict[str, tuple[int, int, str]]
    described: list[NodeDescription]
    payload: dict[str, Any]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    root = tmp_path_factory.mktemp("custodian-demo")
    custodian = root / "etc-chc-nwc"
    synth.generate_region(synth.region_by_slug("nwc"), PERSONS, custodian / "omop", seed=11)
    (custodian / "pathways").mkdir()
    (custodian / "pathways" / "breathless_adults.yaml").write_text(PATHWAY)
    (custodian / "optouts.csv").write_text("person_id,date\n1,2023-01-01\n")
    (custodian / "node.toml").write_text(NODE_TOML)
    before = _snapshot(custodian)
    home = root / "home"  # the demo's state file (~/.chc/demo.json) goes here, not in ~
    home.mkdir()
    workdir = root / "work"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator",
            "demo",
            "--json",
            "--keep-running",
            "--rho",
            str(DEMO_RHO),
            "--node",
            f"nwc={custodian / 'node.toml'}",
            "--workdir",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOME": str(home)},
    )
    try:
        state = wait_for_state(proc, home / ".chc" / "demo.json", timeout_s=180)
        with Federation(state["hub"], Path(state["identity"])) as fed:
            described, missing = fed.nodes()
        assert not missing
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return DemoRun(
        custodian=custodian,
        workdir=workdir,
        before=before,
        after=_snapshot(custodian),
        described=described,
        payload=json.loads(out),
    )


def test_the_node_serves_the_custodians_configuration(demo_run: DemoRun) -> None:
    (node,) = demo_run.described
    assert node.node == "nwc"
    # The custodian's own pathway (from its pathways_dir) and only it, beside the base views.
    assert {v.name for v in node.catalog.views} == {
        "persons",
        "visits",
        "breathless_adults",
        "breathless_adults_admissions",
    }
    assert node.catalog.reference_date == REFERENCE
    assert node.budget.rho_total == pytest.approx(TOTAL_RHO)
    assert node.budget.max_rho_per_query == pytest.approx(MAX_RHO)
    # A fresh ledger in the demo's workdir: only the demo's two questions were charged.
    assert node.budget.rho_spent == pytest.approx(2 * DEMO_RHO)
    assert (demo_run.workdir / "conf" / "nwc.ledger.sqlite").is_file()

    # The demo's node.toml is the custodian's with only the demo-owned keys replaced.
    theirs = load_config(demo_run.custodian / "node.toml")
    ours = load_config(demo_run.workdir / "conf" / "nwc.toml")
    owned = {"identity", "listen", "crl", "ledger", "ledger_key"}
    assert ours.listen.startswith("127.0.0.1:")
    assert ours.ledger is not None
    assert demo_run.workdir in ours.ledger.parents
    assert ours.identity.is_relative_to(demo_run.workdir)
    for f in fields(theirs):
        if f.name not in owned:
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def test_the_custodians_files_are_not_touched(demo_run: DemoRun) -> None:
    # Nothing created (no ledger, no key, no identity), changed or removed under the folder.
    assert demo_run.after == demo_run.before


def _exact(sql: str, *params: object) -> int:
    con = duckdb.connect(":memory:")
    try:
        row = con.execute(sql, list(params)).fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0])


def test_without_the_demo_pathways_it_asks_what_the_data_can_answer(demo_run: DemoRun) -> None:
    queries = demo_run.payload["queries"]
    # None of the demo's pathway views is served, so it asks about persons and visits.
    assert [q["query"]["view"] for q in queries] == ["persons", "visits"]
    persons, visits = queries
    assert persons["query"]["group_by"] == ["sex", "age_band"]
    assert visits["query"]["group_by"] == ["visit_type", "year"]
    omop = demo_run.custodian / "omop"
    for q in queries:
        assert not q["partial"]
        assert [(n["node"], n["status"]) for n in q["nodes"]] == [("nwc", "ok")]

    def cell(q: dict[str, Any], **groups: str) -> dict[str, Any]:
        rows: list[dict[str, Any]] = q["rows"]
        (row,) = [r for r in rows if r["region"] == "nwc" and r["groups"] == groups]
        return row

    # Cells far above suppression (hundreds to thousands of people or visits) are released,
    # and near their exact figure. Bounds: 6 noise standard errors (false failure < 1e-8 per
    # cell) plus the rounding step (5), plus what the one opted-out person can move (1 person,
    # at most 50 visits), plus, for persons, the age band of those whose birthday is near the
    # reference date (the lower bound below counts only people safely inside the band).
    for sex, concept in (("female", 8532), ("male", 8507)):
        row = cell(persons, sex=sex, age_band="40-64")
        inside = _exact(
            "SELECT count(*) FROM read_parquet($1) WHERE gender_concept_id = $2 "
            "AND year_of_birth BETWEEN $3 AND $4 "
            "AND person_id NOT IN (SELECT person_id FROM read_parquet($5))",
            str(omop / "person.parquet"),
            concept,
            REFERENCE.year - 63,
            REFERENCE.year - 41,
            str(omop / "death.parquet"),
        )
        assert inside > 500
        assert not row["suppressed"]
        assert row["estimate"] >= inside - 6 * row["std_error"] - 5 - 1
    for visit_type, concept in (("outpatient", 9202), ("emergency", 9203)):
        row = cell(visits, visit_type=visit_type, year="2023")
        exact = _exact(
            "SELECT count(*) FROM read_parquet($1) "
            "WHERE visit_concept_id = $2 AND year(visit_start_date) = 2023",
            str(omop / "visit_occurrence.parquet"),
            concept,
        )
        assert exact > 1000
        assert not row["suppressed"]
        assert abs(row["estimate"] - exact) <= 6 * row["std_error"] + 5 + 50
