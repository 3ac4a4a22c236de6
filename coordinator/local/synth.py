"""Seeded synthetic OMOP CDM v5.4 data for the four Connected Health Cities (CHC) regions.

Writes person, observation_period, visit_occurrence, condition_occurrence, death and location
as one Parquet file per table, plus ``lsoa_imd.csv``: a (synthetic) national lookup from LSOA
code to IMD 2019 decile and quintile, which a node reads as its ``imd_lookup`` (it is not an
OMOP table; the node ignores it as an extra file). Persons are generated in chunks with numpy
(no per-person Python loops) and streamed through ``pyarrow.parquet.ParquetWriter`` so memory
stays bounded at 1M+ persons. This is synthetic test data, not privacy noise, so an ordinary
seeded ``numpy.random.Generator`` (PCG64) is used.

What the data is meant to look like, every assumption, its source and the designed regional
differences are in docs/synthetic-data.md; the constants below carry short notes only.
Figures are cited by the source keys of docs/synthetic-data.md.

Determinism: chunk ``k`` of a region is drawn from ``SeedSequence(seed, spawn_key=(region
key, k))``, so the same seed, region, size, reference date and chunk size give identical
rows. A different chunk size gives different rows with the same distribution. The LSOA
lookup and each region's LSOAs do not depend on the seed (like a published national file).
"""

from __future__ import annotations

import calendar
import functools
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.typing import NDArray

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class Region:
    """A CHC region; ``population`` is used only for relative sizes and LSOA counts."""

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

# Share of each region's residents in national IMD 2019 quintiles 1 (most deprived) to 5.
# Nationally each quintile holds 20% [IoD]; the North has more of its
# neighbourhoods among the most deprived. Our approximation, see docs/synthetic-data.md.
IMD_SHARES: Final[Mapping[str, tuple[float, float, float, float, float]]] = {
    "nenc": (0.31, 0.21, 0.18, 0.16, 0.14),
    "nwc": (0.33, 0.19, 0.17, 0.16, 0.15),
    "yh": (0.29, 0.21, 0.18, 0.17, 0.15),
    "gm": (0.36, 0.21, 0.16, 0.14, 0.13),
}
NO_LOCATION_SHARE: Final = 0.02  # persons without a usable address: IMD unknown
PERSONS_PER_LSOA: Final = 1_500  # an LSOA holds about 1,500 residents
LOOKUP_FILE: Final = "lsoa_imd.csv"

# Designed regional differences (docs/synthetic-data.md), so comparisons have a signal:
# relative multipliers on condition prevalence, and on 30-day readmission risk.
REGIONAL_PREVALENCE_MULTIPLIERS: Final[Mapping[str, Mapping[int, float]]] = {
    "nwc": {COPD: 1.5},
    "nenc": {ALCOHOLIC_LIVER: 1.6},
}
REGIONAL_READMISSION_MULTIPLIERS: Final[Mapping[str, float]] = {"gm": 1.6}

TABLE_NAMES: Final[tuple[str, ...]] = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "death",
    "location",
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
    "location": pa.schema(
        [
            _field("location_id", _I64, required=True),
            _field("city", pa.string()),
            _field("county", pa.string()),
            _field("location_source_value", pa.string()),
            _field("country_source_value", pa.string()),
        ]
    ),
}

# --- Demography and rates -------------------------------------------------------------

_MAX_AGE: Final = 100
_ADULT_AGE: Final = 18
_FEMALE_SHARE: Final = 0.51
_OBSERVATION_START: Final = date(2015, 1, 1)
_WINDOW_DAYS: Final = 3 * 365 + 1
_WINDOW_YEARS: Final = _WINDOW_DAYS / 365.25
_EPOCH: Final = date(1970, 1, 1)
_UNKNOWN_IMD: Final = 5  # index of "no quintile" in the gradient arrays below


def _by_age(steps: tuple[tuple[int, float], ...]) -> FloatArray:
    """Step function over ages 0.._MAX_AGE: each (age, value) holds until the next step."""
    out = np.zeros(_MAX_AGE + 1, dtype=np.float64)
    for age, value in steps:
        out[age:] = value
    return out


def _gradient(q1: float, q2: float, q3: float, q4: float, q5: float) -> FloatArray:
    """Relative risk by IMD quintile (1 = most deprived), mean 1 over equal quintiles.

    Normalised so that the national mean (20% in each quintile) is unchanged; a region
    skewed towards deprivation then has higher rates than the nation, as the North does.
    The sixth entry, for persons whose quintile is unknown, is 1.
    """
    values = np.array([q1, q2, q3, q4, q5], dtype=np.float64)
    return np.append(values / values.mean(), 1.0)


def _age_pmf() -> FloatArray:
    weights = np.zeros(_MAX_AGE + 1, dtype=np.float64)
    # Census 2021 broad bands [Census], then our split of 65+.
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
    prevalence: FloatArray  # by age at reference date, national
    deprivation: FloatArray  # relative prevalence by IMD quintile (_gradient)
    acute_multiplier: float  # on emergency, elective and outpatient visit rates
    death_hazard: float  # relative risk of death
    severe: bool  # raises admission risk and length of stay

    @property
    def link_probability(self) -> float:
        """Chance the condition is recorded on one of the person's acute visits.

        About the share of their excess acute visits the condition explains, (m - 1) / m,
        plus a floor for coding as a comorbidity.
        """
        m = self.acute_multiplier
        return 0.1 + 0.8 * (m - 1) / m


_CONDITIONS: Final[tuple[_Condition, ...]] = (
    _Condition(
        ASTHMA,
        "J45.9",
        _by_age(((0, 0.09), (_ADULT_AGE, 0.08))),
        _gradient(1.25, 1.1, 1.0, 0.9, 0.85),
        1.5,
        1.0,
        False,
    ),
    _Condition(
        COPD,
        "J44.9",
        _scaled(
            _by_age(((35, 0.1), (40, 0.4), (50, 1.0), (60, 2.0), (70, 3.0), (80, 3.2))),
            0.04,
            40,
        ),
        _gradient(2.0, 1.4, 1.0, 0.75, 0.6),
        2.5,
        2.5,
        True,
    ),
    _Condition(
        EPILEPSY,
        "G40.9",
        _epilepsy(),
        _gradient(1.4, 1.2, 1.0, 0.85, 0.75),
        2.0,
        1.6,
        False,
    ),
    _Condition(
        ALCOHOLIC_LIVER,
        "K70.9",
        _scaled(
            _by_age(((18, 0.2), (30, 0.6), (40, 1.2), (50, 1.6), (60, 1.4), (70, 0.8), (80, 0.4))),
            0.005,
            _ADULT_AGE,
        ),
        _gradient(2.5, 1.6, 1.0, 0.7, 0.5),
        3.0,
        4.0,
        True,
    ),
    _Condition(
        TYPE_2_DIABETES,
        "E11.9",
        _scaled(
            _by_age(((18, 0.1), (30, 0.3), (40, 0.7), (50, 1.3), (60, 2.0), (70, 2.5), (80, 2.4))),
            0.07,
            _ADULT_AGE,
        ),
        _gradient(1.5, 1.2, 1.0, 0.85, 0.7),
        1.3,
        1.3,
        False,
    ),
)
_COPD_INDEX: Final = 1
_LIVER_INDEX: Final = 3

_ACUTE_AGE_MULTIPLIER: Final = _by_age(
    ((0, 1.6), (5, 0.7), (15, 1.0), (25, 0.9), (65, 1.2), (80, 2.0))
)
# A&E attendances, most against least deprived: 3.3m against 1.7m a year by decile (RCEM
# 2023/24, [A&E]); our quintile gradient is a little flatter.
_ACUTE_DEPRIVATION: Final = _gradient(1.3, 1.1, 0.95, 0.85, 0.8)


def _acute_normaliser() -> float:
    # Expected multiplier over the population with base prevalences, so base rates stay
    # national means (conditions independent given age; deprivation averages out).
    per_age = _ACUTE_AGE_MULTIPLIER.copy()
    for cond in _CONDITIONS:
        per_age *= 1 + (cond.acute_multiplier - 1) * cond.prevalence
    return float(np.dot(_AGE_PMF, per_age))


_ACUTE_NORMALISER: Final = _acute_normaliser()
_EMERGENCY_RATE: Final = 0.36
_ELECTIVE_RATE: Final = 0.05
_OUTPATIENT_RATE: Final = 1.0
_ADMIT_BY_AGE: Final = _by_age(((0, 0.12), (_ADULT_AGE, 0.15), (65, 0.3), (80, 0.45)))
_ADMIT_SEVERE: Final = 1.5
_ADMIT_DEPRIVATION: Final = _gradient(1.1, 1.05, 1.0, 0.95, 0.9)

# Length of stay: same-day stays by age, then geometric with a mean that rises with age.
_SAME_DAY_BY_AGE: Final = _by_age(((0, 0.45), (_ADULT_AGE, 0.3), (65, 0.2), (80, 0.15)))
_LOS_MEAN_BY_AGE: Final = _by_age(((0, 1.8), (_ADULT_AGE, 3.5), (65, 6.0), (80, 8.5)))
_LOS_SEVERE: Final = 1.3
_LOS_ELECTIVE: Final = 0.6
_LOS_DEPRIVATION: Final = _gradient(1.1, 1.05, 1.0, 0.95, 0.9)
_MAX_LOS: Final = 90

# 30-day emergency readmission after a stay, on top of what chance alone produces.
_READMIT_EMERGENCY: Final = 0.08
_READMIT_ELECTIVE: Final = 0.04
_READMIT_BY_AGE: Final = _by_age(((0, 0.7), (_ADULT_AGE, 1.0), (65, 1.3), (80, 1.5)))
_READMIT_SEVERE: Final = 1.6
_READMIT_DEPRIVATION: Final = _gradient(1.2, 1.1, 1.0, 0.9, 0.85)
_READMIT_MEAN_GAP: Final = 10.0  # days from discharge; at most 30
_READMISSION_DAYS: Final = 30

# Deaths: about 1% of the population a year (ONS deaths in England and Wales, ~580,000 a
# year for ~60m people), Gompertz-shaped in age.
_ANNUAL_DEATHS: Final = 0.01
_DEATH_DEPRIVATION: Final = _gradient(1.5, 1.2, 1.0, 0.85, 0.7)
_MAX_DEATH_P: Final = 0.9
_CAUSE_SHARE: Final = 0.3


def _death_probability() -> FloatArray:
    """Probability of dying within the 3-year window, by age (before other risks)."""
    ages = np.arange(_MAX_AGE + 1, dtype=np.float64)
    shape = np.exp(0.09 * (ages - _MAX_AGE))
    # Infant mortality is roughly that of a 60-year-old.
    shape[0] += np.exp(0.09 * (60 - _MAX_AGE))
    risk = np.ones(_MAX_AGE + 1, dtype=np.float64)
    for cond in _CONDITIONS:
        risk *= 1 + (cond.death_hazard - 1) * cond.prevalence
    mean = float(np.dot(_AGE_PMF, shape * risk))
    return shape * (_ANNUAL_DEATHS * _WINDOW_YEARS / mean)


_DEATH_P: Final = _death_probability()

_RECORDS_EXTRA_MEAN: Final = 0.6


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


def imd_shares(region: Region) -> tuple[float, float, float, float, float]:
    """The region's share of residents in IMD quintiles 1-5 (before unknown addresses)."""
    return IMD_SHARES[region.slug]


# --- Areas: LSOAs and the IMD lookup --------------------------------------------------

_LOOKUP_SEED: Final = 20_190_926  # IoD2019 publication date; the lookup ignores the seed


@dataclass(frozen=True)
class _Areas:
    """A region's LSOAs: location ids first_id.., their codes and IMD quintiles (1-5)."""

    first_id: int
    codes: tuple[str, ...]
    quintile: IntArray
    decile: IntArray


@functools.cache
def _areas(slug: str) -> _Areas:
    first = 1
    for region in REGIONS:
        n = max(1, region.population // PERSONS_PER_LSOA)
        if region.slug == slug:
            break
        first += n
    else:  # pragma: no cover - callers pass known slugs
        raise ValueError(slug)
    shares = np.array(IMD_SHARES[slug])
    quotas = shares * n
    counts = np.floor(quotas).astype(np.int64)
    for i in np.argsort(counts - quotas)[: n - int(counts.sum())]:
        counts[i] += 1
    quintile = np.repeat(np.arange(1, 6, dtype=np.int64), counts)
    # Within a quintile, alternate its two deciles (quintile q holds deciles 2q-1 and 2q).
    rank = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    decile = 2 * quintile - 1 + rank % 2
    rng = np.random.Generator(
        np.random.PCG64(
            np.random.SeedSequence(_LOOKUP_SEED, spawn_key=(zlib.crc32(slug.encode("utf-8")),))
        )
    )
    order = rng.permutation(n)
    codes = tuple(f"Z01{first + i:06d}" for i in range(n))
    return _Areas(first, codes, quintile[order], decile[order])


def _location_table(region: Region) -> pa.Table:
    areas = _areas(region.slug)
    n = len(areas.codes)
    return pa.Table.from_arrays(
        [
            _int_array(areas.first_id + np.arange(n, dtype=np.int64)),
            pa.nulls(n, pa.string()),
            pa.array([region.name] * n, pa.string()),
            pa.array(areas.codes, pa.string()),
            pa.array(["GB"] * n, pa.string()),
        ],
        schema=SCHEMAS["location"],
    )


def imd_lookup_table() -> pa.Table:
    """The synthetic national LSOA -> IMD lookup, like File 1 of the IoD2019 (as CSV)."""
    codes: list[str] = []
    deciles: list[IntArray] = []
    quintiles: list[IntArray] = []
    for region in REGIONS:
        areas = _areas(region.slug)
        codes += areas.codes
        deciles.append(areas.decile)
        quintiles.append(areas.quintile)
    return pa.table(
        {
            "lsoa_code": pa.array(codes, pa.string()),
            "imd_decile": pa.array(np.concatenate(deciles), _I64),
            "imd_quintile": pa.array(np.concatenate(quintiles), _I64),
        }
    )


def write_imd_lookup(path: Path) -> Path:
    """Write the synthetic LSOA -> IMD lookup as CSV (a node's `imd_lookup`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(imd_lookup_table(), path)
    return path


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


@dataclass(frozen=True)
class _Settings:
    """Everything about a region that is not random."""

    cal: _Calendar
    areas: _Areas
    prevalence: Mapping[int, float]
    readmission: float


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
    imd: IntArray  # 0-4 for quintiles 1-5, _UNKNOWN_IMD without a location
    location_id: IntArray  # -1 for none
    flags: BoolArray  # shape (len(_CONDITIONS), n)
    died: BoolArray
    end: IntArray  # death date or reference date
    obs_start: IntArray
    window_lo: IntArray  # first day visits and deaths may fall on

    @property
    def severe(self) -> BoolArray:
        """Persons with a condition that raises admission risk and length of stay."""
        out = np.zeros(self.ages.shape[0], dtype=np.bool_)
        for k, cond in enumerate(_CONDITIONS):
            if cond.severe:
                out |= self.flags[k]
        return out


def _draw_people(rng: np.random.Generator, n: int, s: _Settings) -> _People:
    cal = s.cal
    ages = rng.choice(_MAX_AGE + 1, size=n, p=_AGE_PMF).astype(np.int64)
    # Birth in (anniversary a+1, anniversary a], so the age at the reference date is exactly a.
    latest = cal.anniversaries[ages]
    earliest = cal.anniversaries[ages + 1] + 1
    birth = _uniform_days(rng, earliest, latest)
    female = rng.random(n) < _FEMALE_SHARE

    # Each person lives in one of the region's LSOAs (equal sizes), a few have no address.
    lsoa = rng.integers(0, s.areas.quintile.shape[0], size=n)
    located = rng.random(n) >= NO_LOCATION_SHARE
    imd = np.where(located, s.areas.quintile[lsoa] - 1, _UNKNOWN_IMD)
    location_id = np.where(located, s.areas.first_id + lsoa, -1)

    flags = np.empty((len(_CONDITIONS), n), dtype=np.bool_)
    for k, cond in enumerate(_CONDITIONS):
        p = cond.prevalence[ages] * cond.deprivation[imd] * s.prevalence.get(cond.concept_id, 1.0)
        flags[k] = rng.random(n) < np.minimum(p, 1.0)

    hazard = _DEATH_DEPRIVATION[imd]
    for k, cond in enumerate(_CONDITIONS):
        hazard = hazard * np.where(flags[k], cond.death_hazard, 1.0)
    died = rng.random(n) < np.minimum(_DEATH_P[ages] * hazard, _MAX_DEATH_P)
    window_lo = np.maximum(birth, cal.window_start)
    death_day = _uniform_days(rng, window_lo, np.full(n, cal.reference, dtype=np.int64))
    end = np.where(died, death_day, cal.reference)
    obs_start = np.maximum(birth, cal.observation_start)
    return _People(ages, birth, female, imd, location_id, flags, died, end, obs_start, window_lo)


def _los(rng: np.random.Generator, people: _People, who: IntArray, scale: float = 1.0) -> IntArray:
    """Length of stay in days for stays of persons `who`."""
    ages = people.ages[who]
    mean = (
        _LOS_MEAN_BY_AGE[ages]
        * np.where(people.severe[who], _LOS_SEVERE, 1.0)
        * _LOS_DEPRIVATION[people.imd[who]]
        * scale
    )
    stay = rng.geometric(1.0 / np.maximum(mean, 1.0)).astype(np.int64)
    same_day = rng.random(who.shape[0]) < _SAME_DAY_BY_AGE[ages]
    return np.minimum(np.where(same_day, 0, stay), _MAX_LOS)


@dataclass(frozen=True)
class _Visits:
    person_index: IntArray  # sorted ascending
    concept: IntArray
    start: IntArray
    end: IntArray
    preceding: IntArray  # index into these arrays, -1 for none
    ids: IntArray


def _readmissions(
    rng: np.random.Generator,
    people: _People,
    s: _Settings,
    who: IntArray,
    discharge: IntArray,
    emergency: BoolArray,
) -> tuple[IntArray, IntArray]:
    """Emergency readmissions within 30 days of the given stays: (person, day)."""
    ages = people.ages[who]
    p = (
        np.where(emergency, _READMIT_EMERGENCY, _READMIT_ELECTIVE)
        * _READMIT_BY_AGE[ages]
        * np.where(people.severe[who], _READMIT_SEVERE, 1.0)
        * _READMIT_DEPRIVATION[people.imd[who]]
        * s.readmission
    )
    back = rng.random(who.shape[0]) < np.minimum(p, 1.0)
    gap = np.minimum(rng.geometric(1.0 / _READMIT_MEAN_GAP, size=who.shape[0]), _READMISSION_DAYS)
    day = discharge + gap
    keep = back & (day <= people.end[who])
    return who[keep], day[keep]


def _draw_visits(rng: np.random.Generator, people: _People, s: _Settings, first_id: int) -> _Visits:
    n = people.ages.shape[0]
    multiplier = _ACUTE_AGE_MULTIPLIER[people.ages] * _ACUTE_DEPRIVATION[people.imd]
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
    el_end = np.minimum(el_start + _los(rng, people, el_who, _LOS_ELECTIVE), people.end[el_who])

    p_admit = (
        _ADMIT_BY_AGE[people.ages]
        * np.where(people.severe, _ADMIT_SEVERE, 1.0)
        * _ADMIT_DEPRIVATION[people.imd]
    )
    admitted = np.flatnonzero(rng.random(er_who.shape[0]) < np.minimum(p_admit, 1.0)[er_who])
    ad_who = er_who[admitted]
    ad_start = er_start[admitted]
    ad_end = np.minimum(ad_start + _los(rng, people, ad_who), people.end[ad_who])

    # Readmissions: an emergency attendance and the admission it leads to, days after a
    # discharge. They join the attendances and admissions above.
    re_who, re_start = _readmissions(
        rng,
        people,
        s,
        np.concatenate([ad_who, el_who]),
        np.concatenate([ad_end, el_end]),
        np.repeat(np.array([True, False]), [ad_who.shape[0], el_who.shape[0]]),
    )
    re_end = np.minimum(re_start + _los(rng, people, re_who), people.end[re_who])
    admitted = np.concatenate([admitted, er_who.shape[0] + np.arange(re_who.shape[0])])
    er_who = np.concatenate([er_who, re_who])
    er_start = np.concatenate([er_start, re_start])
    ad_who = np.concatenate([ad_who, re_who])
    ad_start = np.concatenate([ad_start, re_start])
    ad_end = np.concatenate([ad_end, re_end])

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
    who_parts: list[IntArray] = []
    kind_parts: list[IntArray] = []
    start_parts: list[IntArray] = []
    visit_parts: list[IntArray] = []
    acute = np.flatnonzero(visits.concept != OUTPATIENT)
    acute_person = visits.person_index[acute]
    for k, cond in enumerate(_CONDITIONS):
        # Records outside hospital (primary care, clinics), dated in the observation period.
        having = np.flatnonzero(people.flags[k]).astype(np.int64)
        who = np.repeat(having, 1 + rng.poisson(_RECORDS_EXTRA_MEAN, size=having.shape[0]))
        who_parts.append(who)
        start_parts.append(_uniform_days(rng, people.obs_start[who], people.end[who]))
        visit_parts.append(np.full(who.shape[0], -1, dtype=np.int64))
        # Records on acute visits (any diagnosis position), on the visit's first day.
        link = people.flags[k][acute_person] & (rng.random(acute.shape[0]) < cond.link_probability)
        on = acute[link]
        who_parts.append(visits.person_index[on])
        start_parts.append(visits.start[on])
        visit_parts.append(visits.ids[on])
        kind_parts.append(np.full(who.shape[0] + on.shape[0], k, dtype=np.int64))
    who = np.concatenate(who_parts)
    kind = np.concatenate(kind_parts)
    start = np.concatenate(start_parts)
    visit_id = np.concatenate(visit_parts)
    order = np.lexsort((visit_id, kind, start, who))
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
            _int_array(people.location_id, mask=people.location_id < 0),
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
    # A share of deaths of persons with COPD or liver disease carry it as the cause.
    cause = np.full(m, -1, dtype=np.int64)
    for k in (_COPD_INDEX, _LIVER_INDEX):
        carries = people.flags[k][dead] & (rng.random(m) < _CAUSE_SHARE) & (cause < 0)
        cause[carries] = _CONDITIONS[k].concept_id
    return pa.Table.from_arrays(
        [
            _int_array(person_id[dead]),
            _date_array(people.end[dead]),
            _const(EHR_TYPE, m),
            _int_array(cause, mask=cause < 0),
        ],
        schema=SCHEMAS["death"],
    )


def _chunk_tables(
    rng: np.random.Generator, n: int, s: _Settings, first_ids: Mapping[str, int]
) -> dict[str, pa.Table]:
    people = _draw_people(rng, n, s)
    visits = _draw_visits(rng, people, s, first_ids["visit"])
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
    """Write one region's synthetic OMOP tables to out_dir/<table>.parquet; return row counts.

    Also writes out_dir/lsoa_imd.csv, the LSOA -> IMD lookup a node needs as `imd_lookup`.
    """
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
    settings = _Settings(
        cal=_Calendar(
            reference=reference,
            window_start=max(reference - _WINDOW_DAYS + 1, observation_start),
            observation_start=observation_start,
            anniversaries=_anniversaries(reference_date),
        ),
        areas=_areas(region.slug),
        prevalence=REGIONAL_PREVALENCE_MULTIPLIERS.get(region.slug, {}),
        readmission=REGIONAL_READMISSION_MULTIPLIERS.get(region.slug, 1.0),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(TABLE_NAMES, 0)
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for name in TABLE_NAMES:
            writers[name] = pq.ParquetWriter(out_dir / f"{name}.parquet", SCHEMAS[name])
        location = _location_table(region)
        writers["location"].write_table(location)
        counts["location"] = location.num_rows
        for index, first in enumerate(range(0, persons, chunk_size)):
            sequence = np.random.SeedSequence(seed, spawn_key=(_region_key(region), index))
            rng = np.random.Generator(np.random.PCG64(sequence))
            first_ids = {
                "person": first + 1,
                "visit": counts["visit_occurrence"] + 1,
                "condition": counts["condition_occurrence"] + 1,
            }
            n = min(chunk_size, persons - first)
            for name, table in _chunk_tables(rng, n, settings, first_ids).items():
                writers[name].write_table(table)
                counts[name] += table.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    write_imd_lookup(out_dir / LOOKUP_FILE)
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
