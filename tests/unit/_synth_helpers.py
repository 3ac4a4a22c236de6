"""Shared helpers for the synthetic OMOP generator tests (coordinator.local.synth).

Loading a generated region, reading its columns as numpy, a per-person ``View`` of it and
``check_valid``, the integrity checks every generated region must pass.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.typing import NDArray

from coordinator.local.synth.areas import LOOKUP_FILE

TABLES = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "death",
    "location",
    "care_site",
)
REF = date(2025, 12, 31)
SEED = 20_240_601
LARGE = 50_000

DATE = pa.date32()

ASTHMA, COPD, EPILEPSY, LIVER, T2D = 317009, 255573, 380378, 201612, 201826
INPATIENT, OUTPATIENT, EMERGENCY = 9201, 9202, 9203

Ints = NDArray[np.int64]
Bools = NDArray[np.bool_]


def load(folder: Path) -> dict[str, pa.Table]:
    tables = {name: pq.read_table(folder / f"{name}.parquet") for name in TABLES}
    tables["lookup"] = pacsv.read_csv(folder / LOOKUP_FILE)
    return tables


def col(table: pa.Table, name: str) -> Ints:
    """Column as int64 numpy (dates become days since 1970-01-01; nulls become -1)."""
    column = table.column(name)
    if pa.types.is_date32(column.type):
        column = column.cast(pa.int32())
    return np.asarray(column.fill_null(-1).to_numpy(), dtype=np.int64)


def days(d: date) -> int:
    return (d - date(1970, 1, 1)).days


class View:
    """Per-person view of one generated region, indexed by person_id - 1."""

    def __init__(self, tables: dict[str, pa.Table], ref: date = REF) -> None:
        person = tables["person"]
        self.tables = tables
        self.n = person.num_rows
        self.ref = days(ref)
        year = col(person, "year_of_birth")
        month = col(person, "month_of_birth")
        day = col(person, "day_of_birth")
        after = (month > ref.month) | ((month == ref.month) & (day > ref.day))
        self.age: Ints = ref.year - year - after.astype(np.int64)
        self.birth = col(person.set_column(5, "birth", person.column(5).cast(DATE)), "birth")
        self.birth_ymd = (year, month, day)
        death = tables["death"]
        self.died: Bools = np.zeros(self.n, dtype=np.bool_)
        self.died[col(death, "person_id") - 1] = True
        self.end = np.full(self.n, self.ref, dtype=np.int64)
        self.end[col(death, "person_id") - 1] = col(death, "death_date")
        # IMD quintile 1-5 through location -> LSOA code -> lookup; 0 where unknown.
        lookup = tables["lookup"]
        by_code = dict(
            zip(
                lookup.column("lsoa_code").to_pylist(),
                lookup.column("imd_quintile").to_pylist(),
                strict=True,
            )
        )
        location = tables["location"]
        by_location = {
            lid: by_code[code]
            for lid, code in zip(
                col(location, "location_id"),
                location.column("location_source_value").to_pylist(),
                strict=True,
            )
        }
        lids = col(person, "location_id")
        self.quintile: Ints = np.array([by_location.get(i, 0) for i in lids], dtype=np.int64)
        visits = tables["visit_occurrence"]
        self.v_person = col(visits, "person_id") - 1
        self.v_concept = col(visits, "visit_concept_id")
        self.v_start = col(visits, "visit_start_date")
        self.v_end = col(visits, "visit_end_date")
        self.v_preceding = col(visits, "preceding_visit_occurrence_id")

    def has(self, concept: int) -> Bools:
        cond = self.tables["condition_occurrence"]
        ids = col(cond, "person_id")[col(cond, "condition_concept_id") == concept]
        out = np.zeros(self.n, dtype=np.bool_)
        out[ids - 1] = True
        return out

    def rate(self, concept: int, mask: Bools) -> float:
        return float(self.has(concept)[mask].mean())

    def standardised(self, values: NDArray[np.float64], mask: Bools) -> float:
        """Mean of values over mask, reweighted to equal IMD quintiles (the national mix)."""
        return float(np.mean([values[mask & (self.quintile == q)].mean() for q in range(1, 6)]))

    def emergency_counts(self) -> Ints:
        er = self.v_person[self.v_concept == EMERGENCY]
        return np.bincount(er, minlength=self.n)

    def years_at_risk(self) -> NDArray[np.float64]:
        window_lo = np.maximum(self.birth, self.ref - 3 * 365)
        return (self.end - window_lo + 1) / 365.25

    def emergency_per_person_year(self, mask: Bools) -> float:
        return float(self.emergency_counts()[mask].sum() / self.years_at_risk()[mask].sum())

    def emergency_admissions(self) -> Bools:
        return (self.v_concept == INPATIENT) & (self.v_preceding >= 0)

    def readmission_rate(self) -> float:
        """Share of emergency admissions (discharged 30+ days before the reference date)
        followed by another emergency admission within 30 days of discharge."""
        emergency = np.flatnonzero(self.emergency_admissions())
        person, start, end = (
            self.v_person[emergency],
            self.v_start[emergency],
            self.v_end[emergency],
        )
        readmitted = np.zeros(emergency.size, dtype=np.bool_)
        # Visits are sorted by person and start: the next emergency admission is the next row.
        same = person[1:] == person[:-1]
        gap = start[1:] - end[:-1]
        readmitted[:-1] = same & (gap >= 0) & (gap <= 30)
        complete = end <= self.ref - 30
        return float(readmitted[complete].mean())


def check_valid(tables: dict[str, pa.Table], ref: date = REF) -> None:
    """Referential integrity and date sanity that every generated region must satisfy."""
    r = View(tables, ref)
    person = tables["person"]
    assert np.array_equal(col(person, "person_id"), np.arange(1, r.n + 1))
    assert set(np.unique(col(person, "gender_concept_id"))) <= {8507, 8532}
    assert r.age.min() >= 0
    assert r.age.max() <= 100
    assert (r.birth <= r.ref).all()
    assert person.column("person_source_value").to_pylist()[:2] == ["p1", "p2"][: r.n]
    born = person.column("birth_datetime")
    for part, values in zip((pc.year, pc.month, pc.day), r.birth_ymd, strict=True):
        assert np.array_equal(np.asarray(part(born).to_numpy(), dtype=np.int64), values)

    location = tables["location"]
    lids = col(location, "location_id")
    assert np.unique(lids).size == lids.size
    located = col(person, "location_id")
    assert np.isin(located[located >= 0], lids).all()
    codes = set(tables["lookup"].column("lsoa_code").to_pylist())
    assert set(location.column("location_source_value").to_pylist()) <= codes

    obs = tables["observation_period"]
    assert np.array_equal(col(obs, "person_id"), np.arange(1, r.n + 1))
    obs_start = col(obs, "observation_period_start_date")
    assert np.array_equal(obs_start, np.maximum(r.birth, days(date(2015, 1, 1))))
    assert np.array_equal(col(obs, "observation_period_end_date"), r.end)

    death = tables["death"]
    death_pid = col(death, "person_id")
    assert np.unique(death_pid).size == death_pid.size
    death_date = col(death, "death_date")
    assert (death_date >= r.birth[death_pid - 1]).all()
    assert (death_date >= r.ref - 3 * 365).all()
    assert (death_date <= r.ref).all()

    visits = tables["visit_occurrence"]
    vid = col(visits, "visit_occurrence_id")
    assert np.array_equal(vid, np.arange(1, vid.size + 1))
    vpid = col(visits, "person_id")
    assert ((vpid >= 1) & (vpid <= r.n)).all()
    assert (np.diff(vpid) >= 0).all()  # sorted by person
    start = col(visits, "visit_start_date")
    end = col(visits, "visit_end_date")
    assert (start >= r.birth[vpid - 1]).all()
    assert (start >= r.ref - 3 * 365).all()
    assert (end >= start).all()
    assert (end <= r.end[vpid - 1]).all()
    concept = col(visits, "visit_concept_id")
    assert set(np.unique(concept)) <= {INPATIENT, OUTPATIENT, EMERGENCY}
    assert ((end - start)[concept != INPATIENT] == 0).all()
    assert ((end - start)[concept == INPATIENT] <= 90).all()
    preceding = col(visits, "preceding_visit_occurrence_id")
    linked = preceding >= 0
    assert (concept[linked] == INPATIENT).all()
    assert (concept[preceding[linked] - 1] == EMERGENCY).all()
    assert np.array_equal(vpid[preceding[linked] - 1], vpid[linked])
    assert np.array_equal(start[preceding[linked] - 1], start[linked])
    assert (preceding[linked] < vid[linked]).all()

    cond = tables["condition_occurrence"]
    cid = col(cond, "condition_occurrence_id")
    assert np.array_equal(cid, np.arange(1, cid.size + 1))
    cpid = col(cond, "person_id")
    assert ((cpid >= 1) & (cpid <= r.n)).all()
    cstart = col(cond, "condition_start_date")
    assert (cstart >= obs_start[cpid - 1]).all()
    assert (cstart <= r.end[cpid - 1]).all()
    assert set(np.unique(col(cond, "condition_concept_id"))) <= {ASTHMA, COPD, EPILEPSY, LIVER, T2D}
    cvisit = col(cond, "visit_occurrence_id")
    on_visit = cvisit >= 0
    assert np.array_equal(vpid[cvisit[on_visit] - 1], cpid[on_visit])
    assert np.array_equal(start[cvisit[on_visit] - 1], cstart[on_visit])
    assert (concept[cvisit[on_visit] - 1] != OUTPATIENT).all()
