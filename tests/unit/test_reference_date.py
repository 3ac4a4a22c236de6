"""The reference date: by default the end of the data (rounded up to a month end), else
node.toml's; shown with its origin by init and check, carried by the catalog, and a warning
when most of the data falls outside the views' windows.
"""

from __future__ import annotations

import tomllib
from datetime import date, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.bootstrap import init_node
from node.cli import app
from node.config import load_config
from node.data.consent import ConsentPolicy
from node.data.findings import Level, ValidationReport
from node.data.reference import month_end
from node.data.store import OmopStore
from node.data.validate import DataSettings, validate
from protocols.security.pki import Role, create_ca, issue
from queries.pathway import load_pathways
from tests.unit.omop_testdata import EMERGENCY, INPATIENT, OUTPATIENT, Omop, write

PATHWAYS = load_pathways(None)


def old_cdm(*, observation: bool = True) -> Omop:
    """A CDM whose data ends in June 2019: 277 visits from 2008 on, 21 of them in 2016-2019
    (so a fixed 2025-12-31 reference date would keep just those in `visits`)."""
    o = Omop()
    visits = 0
    start = date(2008, 1, 1)
    for pid in range(1, 11):
        o.person(pid, date(1960 + pid, 3, 1))
        if observation:
            o.rows("observation_period").append(
                {
                    "observation_period_id": pid,
                    "person_id": pid,
                    "observation_period_start_date": date(2008, 1, 1),
                    "observation_period_end_date": date(2019, 6, 14 - pid),
                    "period_type_concept_id": 32817,
                }
            )
    # 256 visits in 2008-2015, spread over the persons.
    for i in range(256):
        visits += 1
        day = start + timedelta(days=11 * i)
        assert day.year <= 2015
        o.visit(visits, 1 + i % 10, OUTPATIENT, day)
    # 21 visits in 2016-2019, the last one ending 2019-06-10.
    for i in range(20):
        visits += 1
        o.visit(visits, 1 + i % 10, EMERGENCY, date(2016, 1, 5) + timedelta(days=60 * i))
    visits += 1
    o.visit(visits, 3, INPATIENT, date(2019, 6, 1), date(2019, 6, 10))
    assert visits == 277
    return o


def report_of(source: Path, reference_date: date | None = None) -> ValidationReport:
    return validate(DataSettings(omop=source, reference_date=reference_date), PATHWAYS, threads=1)


def test_month_end() -> None:
    assert month_end(date(2019, 6, 14)) == date(2019, 6, 30)
    assert month_end(date(2020, 2, 1)) == date(2020, 2, 29)
    assert month_end(date(2019, 12, 31)) == date(2019, 12, 31)


def test_the_default_is_the_latest_observation_period_end_rounded_up(tmp_path: Path) -> None:
    store = OmopStore(write(old_cdm(), tmp_path / "omop"), PATHWAYS, threads=1)
    try:
        assert store.reference_date == date(2019, 6, 30)
        assert store.report.reference_origin == (
            "from the data: latest observation_period end 2019-06-13, rounded to month end"
        )
        assert store.catalog().reference_date == date(2019, 6, 30)
        assert store.catalog().view("visits").column("year").domain[-1] == "2019"
        # The ten visit years 2010-2019 now hold every visit from 2010 on.
        n = store.query("SELECT count(*) AS n FROM visits").to_pylist()[0]["n"]
        before = sum(
            1 for i in range(256) if date(2008, 1, 1) + timedelta(days=11 * i) < date(2010, 1, 1)
        )
        assert n == 277 - before
        assert not [f for f in store.report.warnings if f.where == "reference_date"]
    finally:
        store.close()


def test_without_observation_periods_the_latest_visit_end(tmp_path: Path) -> None:
    report = report_of(write(old_cdm(observation=False), tmp_path / "omop"))
    assert report.ok
    assert report.reference_date == date(2019, 6, 30)
    assert report.reference_origin == (
        "from the data: latest visit_occurrence end 2019-06-10, rounded to month end"
    )


def test_open_ended_observation_periods_are_not_the_end_of_the_data(tmp_path: Path) -> None:
    omop = old_cdm()
    omop.rows("observation_period")[0]["observation_period_end_date"] = date(2099, 12, 31)
    report = report_of(write(omop, tmp_path / "omop"))
    assert report.reference_date == date(2019, 6, 30)
    notes = [f for f in report.findings if f.where == "observation_period"]
    assert any("after today" in f.message and f.count == 1 for f in notes), report.render()


def test_an_explicit_date_wins_and_most_data_outside_is_a_warning(tmp_path: Path) -> None:
    source = write(old_cdm(), tmp_path / "omop")
    report = report_of(source, date(2025, 12, 31))
    assert report.reference_date == date(2025, 12, 31)
    assert report.reference_origin == "from node.toml"
    message = next(f.message for f in report.warnings if f.where == "reference_date")
    assert message.startswith("only 21 of 277 visits fall in the visit years 2016-2025")
    assert "set reference_date to the end of your data (2019-06-30)" in message
    store = OmopStore(source, PATHWAYS, reference_date=date(2025, 12, 31), threads=1)
    try:
        assert store.query("SELECT count(*) AS n FROM visits").to_pylist() == [{"n": 21}]
        assert store.catalog().reference_date == date(2025, 12, 31)
    finally:
        store.close()


def test_init_writes_the_derived_date_commented_out_and_shows_it(tmp_path: Path) -> None:
    source = write(old_cdm(), tmp_path / "omop", "csv")
    run = CliRunner().invoke(
        app, ["init", str(tmp_path / "n"), "--name", "yh", "--omop", str(source)]
    )
    assert run.exit_code == 0, run.output
    assert (
        "reference date 2019-06-30 (from the data: latest observation_period end 2019-06-13, "
        "rounded to month end)" in run.output
    )
    text = (tmp_path / "n" / "node.toml").read_text()
    assert "# reference_date = 2019-06-30" in text
    assert '# pathways_dir = "pathways"' in text
    assert "reference_date" not in tomllib.loads(text)
    cfg = load_config(tmp_path / "n" / "node.toml")
    assert cfg.reference_date is None
    # chc-node check shows the same date and origin, and serves with it.
    pki = tmp_path / "pki"
    create_ca(pki)
    issue(pki, role=Role.NODE, name="yh", out_dir=tmp_path / "n" / "identity")
    checked = CliRunner().invoke(app, ["check", "--config", str(tmp_path / "n" / "node.toml")])
    assert checked.exit_code == 0, checked.output
    assert "reference date 2019-06-30 (from the data" in checked.output


def test_init_with_an_explicit_date_writes_it(tmp_path: Path) -> None:
    source = write(old_cdm(), tmp_path / "omop")
    config, report = init_node(
        tmp_path / "n", name="yh", omop=source, reference_date=date(2025, 12, 31)
    )
    assert load_config(config).reference_date == date(2025, 12, 31)
    assert report.reference_origin == "from node.toml"
    assert any(f.level is Level.WARNING and f.where == "reference_date" for f in report.findings)
    assert "reference date 2025-12-31 (from node.toml)" in report.render()


@pytest.mark.parametrize("fmt", ["parquet", "duckdb"])
def test_most_conditions_outside_the_windows_is_a_warning(fmt: str, tmp_path: Path) -> None:
    o = Omop()
    o.person(1, date(1970, 1, 1))
    o.visit(1, 1, OUTPATIENT, date(2025, 11, 1))
    for i in range(5):
        o.condition(1, 255573, date(2005 + i, 1, 1))  # COPD, before the visit years
    target = tmp_path / ("omop.duckdb" if fmt == "duckdb" else "omop")
    report = report_of(write(o, target, fmt))
    assert report.reference_date == date(2025, 11, 30)
    message = next(f.message for f in report.warnings if f.where == "reference_date")
    assert "only 0 of 5 condition records" in message


def test_a_consent_rebuild_keeps_the_published_date(tmp_path: Path) -> None:
    omop = old_cdm()
    source = write(omop, tmp_path / "omop")
    reg = tmp_path / "optouts.csv"
    reg.write_text("person_id,date\n1,2019-01-01\n")
    policy = ConsentPolicy(registers=(reg,))
    store = OmopStore(source, PATHWAYS, threads=1, consent=policy, recheck_s=None)
    try:
        assert store.reference_date == date(2019, 6, 30)
        # The data grows past the published date, then a register changes: the rebuilt views
        # must still match the catalog Describe published at start.
        omop.visit(9999, 2, OUTPATIENT, date(2021, 3, 3))
        omop.rows("observation_period")[1]["observation_period_end_date"] = date(2021, 3, 3)
        write(omop, source)
        reg.write_text("person_id,date\n1,2019-01-01\n2,2019-01-01\n")
        assert store.reload_if_changed()
        assert store.refusal is None
        assert store.generation == 2
        assert store.reference_date == date(2019, 6, 30)
        assert store.report.reference_date == date(2019, 6, 30)
        assert store.catalog().reference_date == date(2019, 6, 30)
        years = store.query("SELECT DISTINCT CAST(year AS VARCHAR) AS y FROM visits")
        assert max(r["y"] for r in years.to_pylist()) == "2019"
    finally:
        store.close()
