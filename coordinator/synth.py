"""Seeded synthetic OMOP CDM v5.4 data for the four Connected Health Cities (CHC) regions.

Writes person, observation_period, visit_occurrence, condition_occurrence and death as one
Parquet file per table. Persons are generated in chunks with numpy (no per-person Python
loops) and streamed through ``pyarrow.parquet.ParquetWriter`` so memory stays bounded at
1M+ persons. This is synthetic test data, not privacy noise, so an ordinary seeded
``numpy.random.Generator`` (PCG64) is used.

Assumptions and their sources (DOMAIN.md = /work/shared/docs/DOMAIN.md):

* Regions and relative sizes: NENC ~3.6m, NWC ~4m, Y&H 5.5m (CUREd), GM ~2.8m (unverified)
  -- DOMAIN.md section 1. Only the ratios are used, to split a total across regions.
* Columns, types and NOT NULL flags follow the minimal OMOP v5.4 DDL -- DOMAIN.md section 4.
  Ids, concepts and year/month/day of birth are int64, dates are date32, birth_datetime is
  midnight of the birth date. race/ethnicity concepts are 0 and location_id is null because
  nothing about them is modelled. All type concepts are 32817 ("EHR").
* Concepts (DOMAIN.md section 4): 8507/8532 gender; 317009 asthma, 255573 COPD, 380378
  epilepsy, 201612 alcoholic liver damage, 201826 type 2 diabetes; visits 9201 inpatient,
  9202 outpatient, 9203 emergency room. condition_source_value holds the ICD-10 code that
  English hospital data would carry (J45.9, J44.9, G40.9, K70.9, E11.9); that mapping is
  ours, not from DOMAIN.md.
* Age and sex (DOMAIN.md section 5, Census 2021): under 15 17.4%, 15-64 64.1%, 65+ 18.6%,
  51% female. Ages are uniform within 0-14 and 15-64; the split of 65+ into five-year bands
  (5.0, 4.9, 3.7, 2.5, 1.6, 0.7 and 0.2% for 95-100) is our approximation of ONS estimates
  (unverified). Maximum age 100. Age is measured at ``reference_date``; sex has no effect on
  any rate below.
* Prevalences, "has at least one record" (DOMAIN.md section 5 and the project brief):
  asthma 9% of under-18s and 8% of adults ("1 in 11" children); COPD 4% of over-40s, zero
  under 35 and rising with age; epilepsy 1% overall with 1 in 220 children; alcohol-related
  liver disease 0.5% of adults, peaking at 50-59; type 2 diabetes 7% of adults, rising with
  age. The age shapes are ours; each is rescaled so its stated group hits the target exactly
  in expectation. Conditions are independent given age.
* Designed regional difference: North West Coast has COPD prevalence x1.5 at every age (a
  nod to its COPD pathway, DOMAIN.md section 1) so that federated comparisons have a real
  signal to find. Because COPD raises emergency attendance and death, NWC also has slightly
  more of both. Every other rate is the same in all regions.
* Emergency attendances: 0.36 per person-year on average (DOMAIN.md section 5, A&E,
  "my calculation, unverified"), higher for under-5s and over-80s and multiplied by 1.5
  (asthma), 2.5 (COPD), 2.0 (epilepsy), 3.0 (liver) and 1.3 (diabetes) -- multipliers are
  ours. The base is rescaled so the population mean stays 0.36 (observed ~0.355 per
  person-year at risk, as sicker and older people die sooner). Visits fall in the 3 years
  (1,096 days) before ``reference_date``, never before 2015-01-01, birth or after death.
* Admissions: on average about 20% of emergency attendances are followed by an inpatient
  stay starting the same day (DOMAIN.md section 5: "20% admitted"); the rate rises with age
  and is x1.5 with COPD or liver disease. Admissions point back with
  preceding_visit_occurrence_id; admitted_from/discharged_to stay null because their place
  of service concepts are not verified. Length of stay is geometric (0 days 30% of the
  time, mean ~2.3), capped at 30 and at death or reference date. There are also elective
  admissions (0.05 per person-year) and outpatient visits (1.0 per person-year), with the
  same relative multipliers; both rates are ours, chosen to keep file sizes modest.
* Condition records: 1 + Poisson(0.6) records per person and condition, dated uniformly in
  the observation period; half of those for persons with an emergency or inpatient visit
  are attached to one of those visits and take its date.
* Deaths: about 1% of persons over the 3-year window (project brief), with Gompertz-shaped
  risk doubling roughly every 8 years of age, an infant bump, and a hazard ratio of 2.5 for
  COPD (ours). 30% of deaths of persons with COPD carry cause_concept_id 255573.
* observation_period: one per person (id = person_id), from 2015-01-01 or birth, to
  ``reference_date`` or death.

Determinism: chunk ``k`` of a region is drawn from ``SeedSequence(seed, spawn_key=(region
key, k))``, so the same seed, region, size, reference date and chunk size give identical
rows. A different chunk size gives different rows with the same distribution.
"""

from __future__ import annotations

import calendar
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class Region:
    """A CHC region; ``population`` is used only for relative sizes."""

    slug: str
    name: str
    population: int


REGIONS: Final[tuple[Region, ...]] = (
    Region("nenc", "North East and North Cumbria", 3_600_000),
    Region("nwc", "North West Coast", 4_000_000),
    Region("yh", "Yorkshire and Humber", 5_500_000),
    Region("gm", "Greater Manchester", 2_800_000),
)

MALE: Final = 8507
FEMALE: Final = 8532
ASTHMA: Final = 317009
COPD: Final = 255573
EPILEPSY: Final = 380378
ALCOHOLIC_LIVER: Final = 201612
TYPE_2_DIABETES: Final = 201826
INPATIENT: Final = 9201
OUTPATIENT: Final = 9202
EMERGENCY_ROOM: Final = 9203
EHR_TYPE: Final = 32817

# Relative multipliers on condition prevalence by region slug; see the module docstring.
REGIONAL_PREVALENCE_MULTIPLIERS: Final[Mapping[str, Mapping[int, float]]] = {
    "nwc": {COPD: 1.5},
}

TABLE_NAMES: Final[tuple[str, ...]] = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "death",
)


def _field(name: str, kind: pa.DataType, *, required: bool = False) -> pa.Field:
    return pa.field(name, kind, nullable=not required)


_I64 = pa.int64()
_DATE = pa.date32()

SCHEMAS: Final[Mapping[str, pa.Schema]] = {
    "person": pa.schema(
        [
            _field("person_id", _I64, required=True),
            _field("gender_concept_id", _I64, required=True),
            _field("year_of_birth", _I64, required=True),
            _field("month_of_birth", _I64),
            _field("day_of_birth", _I64),
            _field("birth_datetime", pa.timestamp("us")),
            _field("race_concept_id", _I64, required=True),
            _field("ethnicity_concept_id", _I64, required=True),
            _field("location_id", _I64),
            _field("person_source_value", pa.string()),
        ]
    ),
    "observation_period": pa.schema(
        [
            _field("observation_period_id", _I64, required=True),
            _field("person_id", _I64, required=True),
            _field("observation_period_start_date", _DATE, required=True),
            _field("observation_period_end_date", _DATE, required=True),
            _field("period_type_concept_id", _I64, required=True),
        ]
    ),
    "visit_occurrence": pa.schema(
        [
            _field("visit_occurrence_id", _I64, required=True),
            _field("person_id", _I64, required=True),
            _field("visit_concept_id", _I64, required=True),
            _field("visit_start_date", _DATE, required=True),
            _field("visit_end_date", _DATE, required=True),
            _field("visit_type_concept_id", _I64, required=True),
            _field("admitted_from_concept_id", _I64),
            _field("discharged_to_concept_id", _I64),
            _field("preceding_visit_occurrence_id", _I64),
        ]
    ),
    "condition_occurrence": pa.schema(
        [
            _field("condition_occurrence_id", _I64, required=True),
            _field("person_id", _I64, required=True),
            _field("condition_concept_id", _I64, required=True),
            _field("condition_start_date", _DATE, required=True),
            _field("condition_end_date", _DATE),
            _field("condition_type_concept_id", _I64, required=True),
            _field("visit_occurrence_id", _I64),
            _field("condition_source_value", pa.string()),
        ]
    ),
    "death": pa.schema(
        [
            _field("person_id", _I64, required=True),
            _field("death_date", _DATE, required=True),
            _field("death_type_concept_id", _I64),
            _field("cause_concept_id", _I64),
        ]
    ),
}

# --- Demography and rates -------------------------------------------------------------

_MAX_AGE: Final = 100
_ADULT_AGE: Final = 18
_FEMALE_SHARE: Final = 0.51
_OBSERVATION_START: Final = date(2015, 1, 1)
_WINDOW_DAYS: Final = 3 * 365 + 1
_EPOCH: Final = date(1970, 1, 1)


def _by_age(steps: tuple[tuple[int, float], ...]) -> FloatArray:
    """Step function over ages 0.._MAX_AGE: each (age, value) holds until the next step."""
    out = np.zeros(_MAX_AGE + 1, dtype=np.float64)
    for age, value in steps:
        out[age:] = value
    return out


def _age_pmf() -> FloatArray:
    weights = np.zeros(_MAX_AGE + 1, dtype=np.float64)
    # Census 2021 broad bands (DOMAIN.md section 5), then our split of 65+.
    bands = (
        (0, 15, 17.4),
        (15, 65, 64.1),
        (65, 70, 5.0),
        (70, 75, 4.9),
        (75, 80, 3.7),
        (80, 85, 2.5),
        (85, 90, 1.6),
        (90, 95, 0.7),
        (95, _MAX_AGE + 1, 0.2),
    )
    for lo, hi, share in bands:
        weights[lo:hi] = share / (hi - lo)
    normalised: FloatArray = weights / weights.sum()
    return normalised


_AGE_PMF: Final = _age_pmf()


def _scaled(shape: FloatArray, target: float, min_age: int) -> FloatArray:
    """Rescale an age shape so the mean over ages >= min_age equals target in expectation."""
    pmf = _AGE_PMF[min_age:]
    mean = float(np.dot(pmf, shape[min_age:]) / pmf.sum())
    return shape * (target / mean)


def _epilepsy() -> FloatArray:
    child = 1 / 220
    child_share = float(_AGE_PMF[:_ADULT_AGE].sum())
    # Adults take whatever keeps the all-ages prevalence at 1 in 100.
    adult = (0.01 - child_share * child) / (1 - child_share)
    return _by_age(((0, child), (_ADULT_AGE, adult)))


@dataclass(frozen=True)
class _Condition:
    concept_id: int
    source_value: str
    prevalence: FloatArray  # by age at reference date
    acute_multiplier: float  # on emergency, elective and outpatient visit rates


_CONDITIONS: Final[tuple[_Condition, ...]] = (
    _Condition(ASTHMA, "J45.9", _by_age(((0, 0.09), (_ADULT_AGE, 0.08))), 1.5),
    _Condition(
        COPD,
        "J44.9",
        _scaled(
            _by_age(((35, 0.1), (40, 0.4), (50, 1.0), (60, 2.0), (70, 3.0), (80, 3.2))),
            0.04,
            40,
        ),
        2.5,
    ),
    _Condition(EPILEPSY, "G40.9", _epilepsy(), 2.0),
    _Condition(
        ALCOHOLIC_LIVER,
        "K70.9",
        _scaled(
            _by_age(((18, 0.2), (30, 0.6), (40, 1.2), (50, 1.6), (60, 1.4), (70, 0.8), (80, 0.4))),
            0.005,
            _ADULT_AGE,
        ),
        3.0,
    ),
    _Condition(
        TYPE_2_DIABETES,
        "E11.9",
        _scaled(
            _by_age(((18, 0.1), (30, 0.3), (40, 0.7), (50, 1.3), (60, 2.0), (70, 2.5), (80, 2.4))),
            0.07,
            _ADULT_AGE,
        ),
        1.3,
    ),
)
_COPD_INDEX: Final = 1
_LIVER_INDEX: Final = 3

_ACUTE_AGE_MULTIPLIER: Final = _by_age(
    ((0, 1.6), (5, 0.7), (15, 1.0), (25, 0.9), (65, 1.2), (80, 2.0))
)


def _acute_normaliser() -> float:
    # Expected multiplier over the population with base prevalences, so base rates stay
    # population means (conditions are independent given age).
    per_age = _ACUTE_AGE_MULTIPLIER.copy()
    for cond in _CONDITIONS:
        per_age *= 1 + (cond.acute_multiplier - 1) * cond.prevalence
    return float(np.dot(_AGE_PMF, per_age))


_ACUTE_NORMALISER: Final = _acute_normaliser()
_EMERGENCY_RATE: Final = 0.36
_ELECTIVE_RATE: Final = 0.05
_OUTPATIENT_RATE: Final = 1.0
_ADMIT_BY_AGE: Final = _by_age(((0, 0.12), (_ADULT_AGE, 0.15), (65, 0.3), (80, 0.45)))
_ADMIT_MULTIPLIER: Final = 1.5
_LOS_GEOMETRIC_P: Final = 0.3
_MAX_LOS: Final = 30

_DEATH_SHARE: Final = 0.01
_COPD_DEATH_HR: Final = 2.5
_COPD_CAUSE_SHARE: Final = 0.3
_MAX_DEATH_P: Final = 0.9


def _death_probability() -> FloatArray:
    ages = np.arange(_MAX_AGE + 1, dtype=np.float64)
    shape = np.exp(0.09 * (ages - _MAX_AGE))
    # Infant mortality is roughly that of a 60-year-old.
    shape[0] += np.exp(0.09 * (60 - _MAX_AGE))
    copd = _CONDITIONS[_COPD_INDEX].prevalence
    mean = float(np.dot(_AGE_PMF, shape * (1 + (_COPD_DEATH_HR - 1) * copd)))
    return shape * (_DEATH_SHARE / mean)


_DEATH_P: Final = _death_probability()

_RECORDS_EXTRA_MEAN: Final = 0.6
_LINK_TO_VISIT_P: Final = 0.5


# --- Public helpers -------------------------------------------------------------------


def region_by_slug(slug: str) -> Region:
    """Return the region with this slug or raise ValueError naming the valid slugs."""
    for region in REGIONS:
        if region.slug == slug:
            return region
    valid = ", ".join(r.slug for r in REGIONS)
    raise ValueError(f"unknown region slug {slug!r}; valid slugs: {valid}")


def split_persons(total: int) -> dict[str, int]:
    """Split total across REGIONS by population share (largest remainder), each at least 1."""
    if total < len(REGIONS):
        raise ValueError(f"total must be at least {len(REGIONS)} (one per region), got {total}")
    pop = sum(r.population for r in REGIONS)
    quotas = [total * r.population / pop for r in REGIONS]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(REGIONS)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    # Tiny totals can leave a region empty; borrow from the largest so every node has data.
    for i in range(len(counts)):
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    return {r.slug: c for r, c in zip(REGIONS, counts, strict=True)}


def _region_key(region: Region) -> int:
    # crc32 of the slug is stable across runs and Python versions, unlike hash().
    return zlib.crc32(region.slug.encode("utf-8"))


def region_seed(seed: int, region: Region) -> int:
    """Derive a region's 64-bit seed deterministically from a federation seed."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    state = np.random.SeedSequence(seed, spawn_key=(_region_key(region),)).generate_state(
        1, np.uint64
    )
    return int(state[0])


# --- Generation -----------------------------------------------------------------------


def _days(d: date) -> int:
    return (d - _EPOCH).days


def _anniversaries(reference_date: date) -> IntArray:
    """Day numbers of the reference date's anniversary a years earlier, for a = 0..MAX+1."""
    out = np.empty(_MAX_AGE + 2, dtype=np.int64)
    for age in range(_MAX_AGE + 2):
        year = reference_date.year - age
        day = min(reference_date.day, calendar.monthrange(year, reference_date.month)[1])
        out[age] = _days(date(year, reference_date.month, day))
    return out


@dataclass(frozen=True)
class _Calendar:
    reference: int
    window_start: int
    observation_start: int
    anniversaries: IntArray


def _uniform_days(rng: np.random.Generator, lo: IntArray, hi: IntArray) -> IntArray:
    """Uniform integer day in [lo, hi] elementwise (hi >= lo)."""
    span = hi - lo + 1
    return lo + (rng.random(lo.shape[0]) * span).astype(np.int64)


def _date_array(days: IntArray) -> pa.Array:
    return pa.array(days.astype("datetime64[D]"))


def _int_array(values: IntArray, mask: BoolArray | None = None) -> pa.Array:
    return pa.array(values, type=_I64, mask=mask)


def _const(value: int, n: int) -> pa.Array:
    return pa.array(np.full(n, value, dtype=np.int64), type=_I64)


@dataclass(frozen=True)
class _People:
    ages: IntArray
    birth: IntArray
    female: BoolArray
    flags: BoolArray  # shape (len(_CONDITIONS), n)
    died: BoolArray
    end: IntArray  # death date or reference date
    obs_start: IntArray
    window_lo: IntArray  # first day visits and deaths may fall on


def _draw_people(
    rng: np.random.Generator, n: int, cal: _Calendar, multipliers: Mapping[int, float]
) -> _People:
    ages = rng.choice(_MAX_AGE + 1, size=n, p=_AGE_PMF).astype(np.int64)
    # Birth in (anniversary a+1, anniversary a], so the age at the reference date is exactly a.
    latest = cal.anniversaries[ages]
    earliest = cal.anniversaries[ages + 1] + 1
    birth = _uniform_days(rng, earliest, latest)
    female = rng.random(n) < _FEMALE_SHARE

    flags = np.empty((len(_CONDITIONS), n), dtype=np.bool_)
    for k, cond in enumerate(_CONDITIONS):
        p = np.minimum(cond.prevalence[ages] * multipliers.get(cond.concept_id, 1.0), 1.0)
        flags[k] = rng.random(n) < p

    copd = flags[_COPD_INDEX]
    p_death = np.minimum(_DEATH_P[ages] * np.where(copd, _COPD_DEATH_HR, 1.0), _MAX_DEATH_P)
    died = rng.random(n) < p_death
    window_lo = np.maximum(birth, cal.window_start)
    death_day = _uniform_days(rng, window_lo, np.full(n, cal.reference, dtype=np.int64))
    end = np.where(died, death_day, cal.reference)
    obs_start = np.maximum(birth, cal.observation_start)
    return _People(ages, birth, female, flags, died, end, obs_start, window_lo)


def _los(rng: np.random.Generator, n: int) -> IntArray:
    return np.minimum(rng.geometric(_LOS_GEOMETRIC_P, size=n) - 1, _MAX_LOS).astype(np.int64)


@dataclass(frozen=True)
class _Visits:
    person_index: IntArray  # sorted ascending
    concept: IntArray
    start: IntArray
    end: IntArray
    preceding: IntArray  # index into these arrays, -1 for none
    ids: IntArray


def _draw_visits(rng: np.random.Generator, people: _People, first_id: int) -> _Visits:
    n = people.ages.shape[0]
    multiplier = _ACUTE_AGE_MULTIPLIER[people.ages]
    for k, cond in enumerate(_CONDITIONS):
        multiplier = multiplier * np.where(people.flags[k], cond.acute_multiplier, 1.0)
    years_at_risk = (people.end - people.window_lo + 1) / 365.25
    exposure = multiplier / _ACUTE_NORMALISER * years_at_risk

    def events(rate: float) -> tuple[IntArray, IntArray]:
        who = np.repeat(np.arange(n, dtype=np.int64), rng.poisson(rate * exposure))
        return who, _uniform_days(rng, people.window_lo[who], people.end[who])

    er_who, er_start = events(_EMERGENCY_RATE)
    op_who, op_start = events(_OUTPATIENT_RATE)
    el_who, el_start = events(_ELECTIVE_RATE)
    el_end = np.minimum(el_start + _los(rng, el_who.shape[0]), people.end[el_who])

    severe = people.flags[_COPD_INDEX] | people.flags[_LIVER_INDEX]
    p_admit = np.minimum(_ADMIT_BY_AGE[people.ages] * np.where(severe, _ADMIT_MULTIPLIER, 1), 1)
    admitted = np.flatnonzero(rng.random(er_who.shape[0]) < p_admit[er_who])
    ad_who = er_who[admitted]
    ad_start = er_start[admitted]
    ad_end = np.minimum(ad_start + _los(rng, admitted.shape[0]), people.end[ad_who])

    n_er, n_ad, n_el, n_op = er_who.shape[0], ad_who.shape[0], el_who.shape[0], op_who.shape[0]
    who = np.concatenate([er_who, ad_who, el_who, op_who])
    start = np.concatenate([er_start, ad_start, el_start, op_start])
    end = np.concatenate([er_start, ad_end, el_end, op_start])
    concept = np.repeat(
        np.array([EMERGENCY_ROOM, INPATIENT, INPATIENT, OUTPATIENT], dtype=np.int64),
        [n_er, n_ad, n_el, n_op],
    )
    preceding = np.full(who.shape[0], -1, dtype=np.int64)
    preceding[n_er : n_er + n_ad] = admitted  # emergency visits come first in `who`
    # Rank ties so an emergency visit precedes the admission it led to on the same day.
    tie_rank = np.repeat(np.array([0, 1, 1, 2], dtype=np.int64), [n_er, n_ad, n_el, n_op])

    order = np.lexsort((tie_rank, start, who))
    new_position = np.empty_like(order)
    new_position[order] = np.arange(order.shape[0])
    old_preceding = preceding[order]
    sorted_preceding = np.where(old_preceding >= 0, new_position[old_preceding], -1)
    return _Visits(
        person_index=who[order],
        concept=concept[order],
        start=start[order],
        end=end[order],
        preceding=sorted_preceding,
        ids=first_id + np.arange(order.shape[0], dtype=np.int64),
    )


@dataclass(frozen=True)
class _Conditions:
    person_index: IntArray
    kind: IntArray  # index into _CONDITIONS
    start: IntArray
    visit_id: IntArray  # -1 for none
    ids: IntArray


def _draw_conditions(
    rng: np.random.Generator, people: _People, visits: _Visits, first_id: int
) -> _Conditions:
    n = people.ages.shape[0]
    who_parts: list[IntArray] = []
    kind_parts: list[IntArray] = []
    for k in range(len(_CONDITIONS)):
        having = np.flatnonzero(people.flags[k]).astype(np.int64)
        records = 1 + rng.poisson(_RECORDS_EXTRA_MEAN, size=having.shape[0])
        who_parts.append(np.repeat(having, records))
        kind_parts.append(np.full(int(records.sum()), k, dtype=np.int64))
    who = np.concatenate(who_parts)
    kind = np.concatenate(kind_parts)
    start = _uniform_days(rng, people.obs_start[who], people.end[who])

    # Acute visits stay grouped by person because visits are sorted by person first.
    acute = visits.concept != OUTPATIENT
    acute_person = visits.person_index[acute]
    acute_ids = visits.ids[acute]
    acute_start = visits.start[acute]
    per_person = np.bincount(acute_person, minlength=n).astype(np.int64)
    offset = np.cumsum(per_person) - per_person
    available = per_person[who]
    link = (available > 0) & (rng.random(who.shape[0]) < _LINK_TO_VISIT_P)
    pick = offset[who] + (rng.random(who.shape[0]) * available).astype(np.int64)
    visit_id = np.full(who.shape[0], -1, dtype=np.int64)
    visit_id[link] = acute_ids[pick[link]]
    start[link] = acute_start[pick[link]]

    order = np.lexsort((kind, start, who))
    return _Conditions(
        person_index=who[order],
        kind=kind[order],
        start=start[order],
        visit_id=visit_id[order],
        ids=first_id + np.arange(order.shape[0], dtype=np.int64),
    )


def _person_table(people: _People, person_id: IntArray) -> pa.Table:
    n = person_id.shape[0]
    birth = people.birth.astype("datetime64[D]")
    year_start = birth.astype("datetime64[Y]")
    month_start = birth.astype("datetime64[M]")
    year = year_start.astype(np.int64) + 1970
    month = (month_start - year_start.astype("datetime64[M]")).astype(np.int64) + 1
    day = (birth - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    source = pc.binary_join_element_wise("p", pc.cast(_int_array(person_id), pa.string()), "")
    return pa.Table.from_arrays(
        [
            _int_array(person_id),
            _int_array(np.where(people.female, FEMALE, MALE).astype(np.int64)),
            _int_array(year),
            _int_array(month),
            _int_array(day),
            pa.array(birth.astype("datetime64[us]")),
            _const(0, n),
            _const(0, n),
            pa.nulls(n, _I64),
            source,
        ],
        schema=SCHEMAS["person"],
    )


def _observation_table(people: _People, person_id: IntArray) -> pa.Table:
    n = person_id.shape[0]
    return pa.Table.from_arrays(
        [
            _int_array(person_id),
            _int_array(person_id),
            _date_array(people.obs_start),
            _date_array(people.end),
            _const(EHR_TYPE, n),
        ],
        schema=SCHEMAS["observation_period"],
    )


def _visit_table(visits: _Visits, first_person_id: int) -> pa.Table:
    m = visits.ids.shape[0]
    has_preceding = visits.preceding >= 0
    preceding_id = np.where(has_preceding, visits.ids[np.maximum(visits.preceding, 0)], 0)
    return pa.Table.from_arrays(
        [
            _int_array(visits.ids),
            _int_array(visits.person_index + first_person_id),
            _int_array(visits.concept),
            _date_array(visits.start),
            _date_array(visits.end),
            _const(EHR_TYPE, m),
            pa.nulls(m, _I64),
            pa.nulls(m, _I64),
            _int_array(preceding_id, mask=~has_preceding),
        ],
        schema=SCHEMAS["visit_occurrence"],
    )


def _condition_table(conds: _Conditions, first_person_id: int) -> pa.Table:
    m = conds.ids.shape[0]
    concepts = np.array([c.concept_id for c in _CONDITIONS], dtype=np.int64)
    sources = pa.array([c.source_value for c in _CONDITIONS], type=pa.string())
    return pa.Table.from_arrays(
        [
            _int_array(conds.ids),
            _int_array(conds.person_index + first_person_id),
            _int_array(concepts[conds.kind]),
            _date_array(conds.start),
            pa.nulls(m, _DATE),
            _const(EHR_TYPE, m),
            _int_array(conds.visit_id, mask=conds.visit_id < 0),
            sources.take(pa.array(conds.kind)),
        ],
        schema=SCHEMAS["condition_occurrence"],
    )


def _death_table(rng: np.random.Generator, people: _People, person_id: IntArray) -> pa.Table:
    dead = np.flatnonzero(people.died)
    m = dead.shape[0]
    copd = people.flags[_COPD_INDEX][dead]
    has_cause = copd & (rng.random(m) < _COPD_CAUSE_SHARE)
    return pa.Table.from_arrays(
        [
            _int_array(person_id[dead]),
            _date_array(people.end[dead]),
            _const(EHR_TYPE, m),
            _int_array(np.full(m, COPD, dtype=np.int64), mask=~has_cause),
        ],
        schema=SCHEMAS["death"],
    )


def _chunk_tables(
    rng: np.random.Generator,
    n: int,
    cal: _Calendar,
    multipliers: Mapping[int, float],
    first_ids: Mapping[str, int],
) -> dict[str, pa.Table]:
    people = _draw_people(rng, n, cal, multipliers)
    visits = _draw_visits(rng, people, first_ids["visit"])
    conds = _draw_conditions(rng, people, visits, first_ids["condition"])
    first_person = first_ids["person"]
    person_id = first_person + np.arange(n, dtype=np.int64)
    return {
        "person": _person_table(people, person_id),
        "observation_period": _observation_table(people, person_id),
        "visit_occurrence": _visit_table(visits, first_person),
        "condition_occurrence": _condition_table(conds, first_person),
        "death": _death_table(rng, people, person_id),
    }


def generate_region(
    region: Region,
    persons: int,
    out_dir: Path,
    *,
    seed: int,
    reference_date: date = date(2025, 12, 31),
    chunk_size: int = 200_000,
) -> dict[str, int]:
    """Write one region's synthetic OMOP tables to out_dir/<table>.parquet; return row counts."""
    if persons < 1:
        raise ValueError(f"persons must be at least 1, got {persons}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if reference_date < _OBSERVATION_START:
        raise ValueError(f"reference_date must be on or after {_OBSERVATION_START.isoformat()}")

    reference = _days(reference_date)
    observation_start = _days(_OBSERVATION_START)
    cal = _Calendar(
        reference=reference,
        window_start=max(reference - _WINDOW_DAYS + 1, observation_start),
        observation_start=observation_start,
        anniversaries=_anniversaries(reference_date),
    )
    multipliers = REGIONAL_PREVALENCE_MULTIPLIERS.get(region.slug, {})
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(TABLE_NAMES, 0)
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for name in TABLE_NAMES:
            writers[name] = pq.ParquetWriter(out_dir / f"{name}.parquet", SCHEMAS[name])
        for index, first in enumerate(range(0, persons, chunk_size)):
            sequence = np.random.SeedSequence(seed, spawn_key=(_region_key(region), index))
            rng = np.random.Generator(np.random.PCG64(sequence))
            first_ids = {
                "person": first + 1,
                "visit": counts["visit_occurrence"] + 1,
                "condition": counts["condition_occurrence"] + 1,
            }
            n = min(chunk_size, persons - first)
            for name, table in _chunk_tables(rng, n, cal, multipliers, first_ids).items():
                writers[name].write_table(table)
                counts[name] += table.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    return counts


def generate_federation(total_persons: int, out_dir: Path, *, seed: int) -> dict[str, Path]:
    """Write every region to out_dir/<slug>/ with per-region seeds; return slug -> folder."""
    folders: dict[str, Path] = {}
    for slug, persons in split_persons(total_persons).items():
        region = region_by_slug(slug)
        folder = out_dir / slug
        generate_region(region, persons, folder, seed=region_seed(seed, region))
        folders[slug] = folder
    return folders
