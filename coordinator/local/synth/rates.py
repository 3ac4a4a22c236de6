"""The national rates the synthetic regions are drawn from: demography, conditions, events.

Holds the age distribution, the five conditions (prevalence by age, deprivation gradient and
effect on visits and deaths) and the rates and multipliers for acute visits, admissions,
length of stay, readmissions and deaths, each normalised so national means hold. It is
separate because these are the figures docs/synthetic-data.md cites and a reviewer checks
against their sources; the draws elsewhere only look them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Final

import numpy as np

from coordinator.local.synth.omop import (
    ALCOHOLIC_LIVER,
    ASTHMA,
    COPD,
    EPILEPSY,
    TYPE_2_DIABETES,
    FloatArray,
)

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
