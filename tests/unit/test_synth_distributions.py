"""Tests for the distributions of the synthetic OMOP generator on 50,000-person regions:
demography, deprivation, conditions, hospital use, deaths and the designed regional
differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.local.synth.generate import generate_region
from coordinator.local.synth.known import KNOWN_WINDOW_DAYS
from coordinator.local.synth.regions import IMD_SHARES, NO_LOCATION_SHARE, region_by_slug
from tests.unit._synth_helpers import (
    ASTHMA,
    COPD,
    EMERGENCY,
    EPILEPSY,
    INPATIENT,
    LARGE,
    LIVER,
    OUTPATIENT,
    SEED,
    T2D,
    Bools,
    View,
    check_valid,
    col,
    load,
)


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


# --- Integrity and chunking ------------------------------------------------------------


def test_large_regions_are_valid(nenc: View, nwc: View) -> None:
    check_valid(nenc.tables)
    check_valid(nwc.tables)


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
    assert abs(unknown - NO_LOCATION_SHARE) < 0.004
    shares = [(view.quintile == q).mean() / (1 - unknown) for q in range(1, 6)]
    for got, want in zip(shares, IMD_SHARES[slug], strict=True):
        assert abs(got - want) < 0.01
    assert shares[0] > 0.25  # the North: more in the most deprived fifth than the 20% average


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
    # COPD is recorded on about 58% of the acute visits of people with COPD, before the
    # COPD pathway's window (in it, the known model decides: test_synth_known_model.py).
    copd_rows = col(cond, "condition_concept_id") == COPD
    linked = np.unique(col(cond, "visit_occurrence_id")[copd_rows])
    linked = linked[linked > 0]
    has_copd = nenc.has(COPD)
    before = nenc.v_start < nenc.ref - KNOWN_WINDOW_DAYS + 1
    acute = (nenc.v_concept != OUTPATIENT) & has_copd[nenc.v_person] & before
    linked_before = linked[before[linked - 1]]
    assert 0.53 <= linked_before.size / acute.sum() <= 0.63


def test_emergency_attendance_rate(nenc: View) -> None:
    everyone = np.ones(nenc.n, dtype=np.bool_)
    per_year = nenc.emergency_counts() / nenc.years_at_risk()
    # 0.36 a person-year nationally (docs/synthetic-data.md); the skew towards deprivation lifts
    # the North.
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
    # 30-day emergency readmissions: regions ~10-12% in 2011/12 (docs/synthetic-data.md), plus
    # deprivation.
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
