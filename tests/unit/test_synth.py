"""Tests for the synthetic OMOP generator in coordinator.synth."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from numpy.typing import NDArray

from coordinator.local import synth
from coordinator.local.synth import REGIONS, generate_federation, generate_region, region_by_slug

TABLES = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "death",
    "location",
)
REF = date(2025, 12, 31)
SEED = 20_240_601
LARGE = 50_000

I64 = pa.int64()
DATE = pa.date32()
EXPECTED_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    "person": [
        ("person_id", I64),
        ("gender_concept_id", I64),
        ("year_of_birth", I64),
        ("month_of_birth", I64),
        ("day_of_birth", I64),
        ("birth_datetime", pa.timestamp("us")),
        ("race_concept_id", I64),
        ("ethnicity_concept_id", I64),
        ("location_id", I64),
        ("person_source_value", pa.string()),
    ],
    "observation_period": [
        ("observation_period_id", I64),
        ("person_id", I64),
        ("observation_period_start_date", DATE),
        ("observation_period_end_date", DATE),
        ("period_type_concept_id", I64),
    ],
    "visit_occurrence": [
        ("visit_occurrence_id", I64),
        ("person_id", I64),
        ("visit_concept_id", I64),
        ("visit_start_date", DATE),
        ("visit_end_date", DATE),
        ("visit_type_concept_id", I64),
        ("admitted_from_concept_id", I64),
        ("discharged_to_concept_id", I64),
        ("preceding_visit_occurrence_id", I64),
    ],
    "condition_occurrence": [
        ("condition_occurrence_id", I64),
        ("person_id", I64),
        ("condition_concept_id", I64),
        ("condition_start_date", DATE),
        ("condition_end_date", DATE),
        ("condition_type_concept_id", I64),
        ("visit_occurrence_id", I64),
        ("condition_source_value", pa.string()),
    ],
    "death": [
        ("person_id", I64),
        ("death_date", DATE),
        ("death_type_concept_id", I64),
        ("cause_concept_id", I64),
    ],
    "location": [
        ("location_id", I64),
        ("city", pa.string()),
        ("county", pa.string()),
        ("location_source_value", pa.string()),
        ("country_source_value", pa.string()),
    ],
}
# NOT NULL columns in the OMOP v5.4 DDL (DOMAIN.md section 4).
REQUIRED: dict[str, set[str]] = {
    "person": {
        "person_id",
        "gender_concept_id",
        "year_of_birth",
        "race_concept_id",
        "ethnicity_concept_id",
    },
    "observation_period": {
        "observation_period_id",
        "person_id",
        "observation_period_start_date",
        "observation_period_end_date",
        "period_type_concept_id",
    },
    "visit_occurrence": {
        "visit_occurrence_id",
        "person_id",
        "visit_concept_id",
        "visit_start_date",
        "visit_end_date",
        "visit_type_concept_id",
    },
    "condition_occurrence": {
        "condition_occurrence_id",
        "person_id",
        "condition_concept_id",
        "condition_start_date",
        "condition_type_concept_id",
    },
    "death": {"person_id", "death_date"},
    "location": {"location_id"},
}

ASTHMA, COPD, EPILEPSY, LIVER, T2D = 317009, 255573, 380378, 201612, 201826
INPATIENT, OUTPATIENT, EMERGENCY = 9201, 9202, 9203

Ints = NDArray[np.int64]
Bools = NDArray[np.bool_]


def load(folder: Path) -> dict[str, pa.Table]:
    tables = {name: pq.read_table(folder / f"{name}.parquet") for name in TABLES}
    tables["lookup"] = pacsv.read_csv(folder / synth.LOOKUP_FILE)
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


def region_view(tmp_path_factory: pytest.TempPathFactory, slug: str) -> View:
    folder = tmp_path_factory.mktemp(slug)
    generate_region(region_by_slug(slug), LARGE, folder, seed=SEED)
    return View(load(folder))


@pytest.fixture(scope="module")
def nenc(tmp_path_factory: pytest.TempPathFactory) -> View:
    return region_view(tmp_path_factory, "nenc")


@pytest.fixture(scope="module")
def nwc(tmp_path_factory: pytest.TempPathFactory) -> View:
    return region_view(tmp_path_factory, "nwc")


@pytest.fixture(scope="module")
def gm(tmp_path_factory: pytest.TempPathFactory) -> View:
    return region_view(tmp_path_factory, "gm")


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


# --- Regions and splitting -------------------------------------------------------------


def test_regions_match_brief() -> None:
    assert [(r.slug, r.population) for r in REGIONS] == [
        ("nenc", 3_600_000),
        ("nwc", 4_000_000),
        ("yh", 5_500_000),
        ("gm", 2_800_000),
    ]
    assert region_by_slug("yh").name == "Yorkshire and Humber"


def test_region_by_slug_error_lists_valid_slugs() -> None:
    with pytest.raises(ValueError, match="unknown region slug 'ne'") as info:
        region_by_slug("ne")
    for region in REGIONS:
        assert region.slug in str(info.value)


def test_split_persons_sums_and_every_region_gets_someone() -> None:
    # Exhaustive over small totals (where rounding bites) plus a spread of large ones.
    totals = [*range(4, 3_000), 40_000, 1_000_003, 999_999_937]
    for total in totals:
        split = synth.split_persons(total)
        assert list(split) == [r.slug for r in REGIONS]
        assert sum(split.values()) == total
        assert min(split.values()) >= 1


def test_split_persons_follows_population_share() -> None:
    split = synth.split_persons(1_000_000)
    pop = sum(r.population for r in REGIONS)
    for region in REGIONS:
        assert abs(split[region.slug] - 1_000_000 * region.population / pop) < 1
    assert synth.split_persons(4) == {"nenc": 1, "nwc": 1, "yh": 1, "gm": 1}


def test_split_persons_rejects_fewer_than_one_per_region() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        synth.split_persons(3)


@pytest.mark.parametrize(
    ("persons", "seed", "ref", "chunk_size", "message"),
    [
        (0, 1, REF, 10, "persons"),
        (10, 1, REF, 0, "chunk_size"),
        (10, -1, REF, 10, "seed"),
        (10, 1, date(2014, 12, 31), 10, "reference_date"),
    ],
)
def test_generate_region_rejects_bad_arguments(
    tmp_path: Path, persons: int, seed: int, ref: date, chunk_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate_region(
            REGIONS[0], persons, tmp_path, seed=seed, reference_date=ref, chunk_size=chunk_size
        )


# --- Determinism and files -------------------------------------------------------------


def test_same_seed_gives_identical_tables(tmp_path: Path) -> None:
    region = region_by_slug("gm")
    counts = generate_region(region, 3_000, tmp_path / "a", seed=7, chunk_size=1_000)
    generate_region(region, 3_000, tmp_path / "b", seed=7, chunk_size=1_000)
    generate_region(region, 3_000, tmp_path / "c", seed=8, chunk_size=1_000)
    a, b, c = load(tmp_path / "a"), load(tmp_path / "b"), load(tmp_path / "c")
    for name in TABLES:
        assert a[name].equals(b[name]), name
        assert counts[name] == a[name].num_rows
    assert not a["person"].equals(c["person"])
    assert not a["visit_occurrence"].equals(c["visit_occurrence"])


def test_schema_matches_omop(tmp_path: Path) -> None:
    generate_region(REGIONS[0], 500, tmp_path, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{t}.parquet" for t in TABLES] + [synth.LOOKUP_FILE]
    )
    for name, expected in EXPECTED_COLUMNS.items():
        schema = pq.read_schema(tmp_path / f"{name}.parquet")
        assert [(f.name, f.type) for f in schema] == expected, name
        for f in schema:
            assert f.nullable == (f.name not in REQUIRED[name]), (name, f.name)


def test_federation_writes_each_region_with_its_own_seed(tmp_path: Path) -> None:
    folders = generate_federation(8_000, tmp_path / "one", seed=11)
    again = generate_federation(8_000, tmp_path / "two", seed=11)
    split = synth.split_persons(8_000)
    assert list(folders) == [r.slug for r in REGIONS]
    births = []
    for slug, folder in folders.items():
        assert folder == tmp_path / "one" / slug
        tables = load(folder)
        assert tables["person"].num_rows == split[slug]
        check_valid(tables)
        for name in TABLES:
            assert tables[name].equals(load(again[slug])[name])
        births.append(col(tables["person"], "year_of_birth")[:1_000])
    for i in range(len(births)):
        for j in range(i + 1, len(births)):
            assert not np.array_equal(births[i], births[j])
    seeds = {synth.region_seed(11, r) for r in REGIONS}
    assert len(seeds) == len(REGIONS)
    assert synth.region_seed(11, REGIONS[0]) == synth.region_seed(11, REGIONS[0])
    assert synth.region_seed(12, REGIONS[0]) != synth.region_seed(11, REGIONS[0])


# --- Integrity and chunking ------------------------------------------------------------


def test_large_regions_are_valid(nenc: View, nwc: View) -> None:
    check_valid(nenc.tables)
    check_valid(nwc.tables)


@pytest.mark.parametrize("chunk_size", [7, 500, 200_000])
def test_chunking_gives_valid_data(tmp_path: Path, chunk_size: int) -> None:
    counts = generate_region(REGIONS[1], 1_200, tmp_path, seed=5, chunk_size=chunk_size)
    tables = load(tmp_path)
    assert counts["person"] == 1_200
    check_valid(tables)


def test_chunk_size_does_not_change_distribution(tmp_path: Path, nenc: View) -> None:
    generate_region(region_by_slug("nenc"), 20_000, tmp_path, seed=SEED, chunk_size=1_500)
    small = View(load(tmp_path))
    everyone = np.ones(small.n, dtype=np.bool_)
    assert abs(small.age.mean() - nenc.age.mean()) < 1.0
    for concept in (ASTHMA, T2D):
        assert abs(small.rate(concept, everyone) - nenc.rate(concept, nenc.age >= 0)) < 0.01
    assert (
        abs(
            small.emergency_per_person_year(everyone)
            - nenc.emergency_per_person_year(nenc.age >= 0)
        )
        < 0.03
    )


def test_other_reference_date_on_leap_day(tmp_path: Path) -> None:
    ref = date(2020, 2, 29)
    generate_region(REGIONS[2], 3_000, tmp_path, seed=9, reference_date=ref, chunk_size=1_000)
    tables = load(tmp_path)
    check_valid(tables, ref)
    visits = tables["visit_occurrence"]
    first = col(visits, "visit_start_date").min()
    assert first >= days(ref - timedelta(days=3 * 365))


# --- Distributions (seeded, so deterministic; tolerances are about 3-4 standard errors) --


def test_demography(nenc: View) -> None:
    female = (col(nenc.tables["person"], "gender_concept_id") == 8532).mean()
    assert 0.50 <= female <= 0.52
    assert 0.164 <= (nenc.age < 15).mean() <= 0.184
    assert 0.631 <= ((nenc.age >= 15) & (nenc.age < 65)).mean() <= 0.651
    assert 0.176 <= (nenc.age >= 65).mean() <= 0.196
    assert nenc.age.max() >= 95


@pytest.mark.parametrize("slug", ["nenc", "nwc", "gm"])
def test_imd_quintiles_follow_the_region(slug: str, nenc: View, nwc: View, gm: View) -> None:
    view = {"nenc": nenc, "nwc": nwc, "gm": gm}[slug]
    unknown = (view.quintile == 0).mean()
    assert abs(unknown - synth.NO_LOCATION_SHARE) < 0.004
    shares = [(view.quintile == q).mean() / (1 - unknown) for q in range(1, 6)]
    for got, want in zip(shares, synth.IMD_SHARES[slug], strict=True):
        assert abs(got - want) < 0.01
    assert shares[0] > 0.25  # the North: more in the most deprived fifth than the 20% average


def test_the_lookup_is_national_and_consistent(tmp_path: Path) -> None:
    path = synth.write_imd_lookup(tmp_path / "lookup.csv")
    lookup = pacsv.read_csv(path)
    codes = lookup.column("lsoa_code").to_pylist()
    assert len(set(codes)) == len(codes)
    assert len(codes) == sum(r.population // synth.PERSONS_PER_LSOA for r in REGIONS)
    decile = col(lookup, "imd_decile")
    assert np.array_equal(col(lookup, "imd_quintile"), (decile + 1) // 2)
    assert set(np.unique(decile)) == set(range(1, 11))
    assert lookup.equals(synth.imd_lookup_table().cast(lookup.schema))


def test_prevalences_hit_national_targets_after_standardising(nenc: View) -> None:
    child = nenc.age < 18
    adult = ~child
    everyone = np.ones(nenc.n, dtype=np.bool_)

    def std(concept: int, mask: Bools) -> float:
        return nenc.standardised(nenc.has(concept).astype(np.float64), mask)

    assert 0.080 <= std(ASTHMA, child) <= 0.100
    assert 0.074 <= std(ASTHMA, adult) <= 0.086
    assert 0.035 <= std(COPD, nenc.age >= 40) <= 0.045
    assert nenc.rate(COPD, nenc.age < 35) == 0.0
    assert 0.0085 <= std(EPILEPSY, everyone) <= 0.0115
    assert 0.0020 <= std(EPILEPSY, child) <= 0.0075
    assert nenc.rate(LIVER, child) == 0.0
    assert 0.065 <= std(T2D, adult) <= 0.075
    # NENC has 1.6 times the national alcohol-related liver disease (0.5% of adults).
    assert 0.0065 <= std(LIVER, adult) <= 0.0100


def test_the_north_is_above_the_national_rate(nenc: View) -> None:
    copd = nenc.has(COPD).astype(np.float64)
    over_40 = nenc.age >= 40
    assert copd[over_40].mean() > 1.08 * nenc.standardised(copd, over_40)


def test_deprivation_gradients(nenc: View) -> None:
    over_40 = nenc.age >= 40
    q1, q5 = nenc.quintile == 1, nenc.quintile == 5
    assert nenc.rate(COPD, over_40 & q1) > 2.5 * nenc.rate(COPD, over_40 & q5)
    assert nenc.rate(ASTHMA, q1) > 1.2 * nenc.rate(ASTHMA, q5)
    ratio = nenc.emergency_per_person_year(q1) / nenc.emergency_per_person_year(q5)
    # RCEM: 3.3m against 1.7m attendances a year, most against least deprived decile.
    assert 1.6 <= ratio <= 2.4
    assert nenc.died[q1].mean() > 1.5 * nenc.died[q5].mean()


def test_chronic_conditions_rise_with_age(nenc: View) -> None:
    young = (nenc.age >= 18) & (nenc.age < 40)
    middle = (nenc.age >= 40) & (nenc.age < 65)
    old = nenc.age >= 65
    assert nenc.rate(T2D, young) < nenc.rate(T2D, middle) < nenc.rate(T2D, old)
    assert nenc.rate(COPD, middle) < nenc.rate(COPD, old)


def test_conditions_are_recorded_on_acute_visits(nenc: View) -> None:
    cond = nenc.tables["condition_occurrence"]
    pairs = col(cond, "person_id") * 1_000_000 + col(cond, "condition_concept_id")
    _, per_pair = np.unique(pairs, return_counts=True)
    assert 0.5 <= (per_pair > 1).mean() <= 0.9
    # COPD is recorded on about 58% of the acute visits of people with COPD.
    copd_rows = col(cond, "condition_concept_id") == COPD
    linked = np.unique(col(cond, "visit_occurrence_id")[copd_rows])
    linked = linked[linked > 0]
    has_copd = nenc.has(COPD)
    acute = (nenc.v_concept != OUTPATIENT) & has_copd[nenc.v_person]
    assert 0.53 <= linked.size / acute.sum() <= 0.63


def test_emergency_attendance_rate(nenc: View) -> None:
    everyone = np.ones(nenc.n, dtype=np.bool_)
    per_year = nenc.emergency_counts() / nenc.years_at_risk()
    # 0.36 a person-year nationally (DOMAIN.md); the skew towards deprivation lifts the North.
    assert 0.33 <= nenc.standardised(per_year, everyone) <= 0.40
    assert nenc.emergency_per_person_year(everyone) > 0.37
    copd = nenc.has(COPD)
    assert nenc.emergency_per_person_year(copd) > 1.8 * nenc.emergency_per_person_year(~copd)


def test_admissions_and_length_of_stay(nenc: View) -> None:
    emergency = nenc.emergency_admissions()
    share = emergency.sum() / (nenc.v_concept == EMERGENCY).sum()
    assert 0.18 <= share <= 0.32
    los = (nenc.v_end - nenc.v_start)[emergency]
    assert np.median(los) <= 3
    assert 3.5 <= los.mean() <= 6.0  # NHS emergency admissions: about 4-5 days on average
    assert los.max() <= 90
    age = nenc.age[nenc.v_person[emergency]]
    assert los[age >= 80].mean() > 2 * los[age < 18].mean()
    planned = (nenc.v_concept == INPATIENT) & ~emergency
    assert (nenc.v_end - nenc.v_start)[planned].mean() < los.mean()


def test_readmissions(nenc: View, gm: View) -> None:
    # 30-day emergency readmissions: regions ~10-12% in 2011/12 (DOMAIN.md), plus deprivation.
    assert 0.10 <= nenc.readmission_rate() <= 0.17
    # Designed: Greater Manchester readmits about 1.4 times as often.
    assert 1.25 <= gm.readmission_rate() / nenc.readmission_rate() <= 1.8


def test_deaths_rise_with_age_copd_and_deprivation(nenc: View) -> None:
    everyone = np.ones(nenc.n, dtype=np.bool_)
    # About 1% a year nationally, over the 3-year window.
    assert 0.025 <= nenc.standardised(nenc.died.astype(np.float64), everyone) <= 0.036
    assert nenc.died[nenc.age >= 80].mean() > 10 * nenc.died[nenc.age < 65].mean()
    old = nenc.age >= 65
    copd = nenc.has(COPD)
    assert nenc.died[old & copd].mean() > 1.5 * nenc.died[old & ~copd].mean()


def test_north_west_coast_has_more_copd(nenc: View, nwc: View) -> None:
    over_40 = (nwc.age >= 40, nenc.age >= 40)

    def std(v: View, concept: int, mask: Bools) -> float:
        return v.standardised(v.has(concept).astype(np.float64), mask)

    ratio = std(nwc, COPD, over_40[0]) / std(nenc, COPD, over_40[1])
    assert 1.3 <= ratio <= 1.7
    for concept in (ASTHMA, T2D):
        other = std(nwc, concept, nwc.age >= 18) / std(nenc, concept, nenc.age >= 18)
        assert 0.9 <= other <= 1.1


def test_north_east_has_more_alcohol_related_liver_disease(nenc: View, nwc: View) -> None:
    adults = (nenc.age >= 18, nwc.age >= 18)
    ratio = nenc.standardised(nenc.has(LIVER).astype(np.float64), adults[0]) / nwc.standardised(
        nwc.has(LIVER).astype(np.float64), adults[1]
    )
    assert 1.25 <= ratio <= 2.0
