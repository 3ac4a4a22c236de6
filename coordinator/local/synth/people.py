"""Drawing the persons of one chunk: age, birth date, sex, address, conditions and death.

Holds the calendar and per-region settings a chunk is drawn under, the ``_People`` arrays
(one entry per person) and ``_draw_people``, which fills them from the national rates, the
region's areas and its designed prevalence multipliers. It is separate because everything
later (visits, condition records, the tables) is drawn per person from these arrays.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

import numpy as np

from coordinator.local.synth.areas import _Areas
from coordinator.local.synth.omop import BoolArray, IntArray
from coordinator.local.synth.rates import (
    _AGE_PMF,
    _CONDITIONS,
    _DEATH_DEPRIVATION,
    _DEATH_P,
    _EPOCH,
    _FEMALE_SHARE,
    _MAX_AGE,
    _MAX_DEATH_P,
    _UNKNOWN_IMD,
)
from coordinator.local.synth.regions import NO_LOCATION_SHARE


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
    region: str  # the slug: the known model's region effect (known.py)


def _uniform_days(rng: np.random.Generator, lo: IntArray, hi: IntArray) -> IntArray:
    """Uniform integer day in [lo, hi] elementwise (hi >= lo)."""
    span = hi - lo + 1
    return lo + (rng.random(lo.shape[0]) * span).astype(np.int64)


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
