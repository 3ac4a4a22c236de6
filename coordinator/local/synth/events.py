"""Drawing each person's hospital visits and condition records.

Holds the emergency, elective and outpatient visits (with admissions after an emergency
attendance, lengths of stay and 30-day readmissions) and the condition records, both outside
hospital and on acute visits. It is separate because these are the event rows of a chunk,
drawn from the persons' arrays and the rates, and sorted and numbered here so the table
builders only convert them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.local.synth.omop import (
    EMERGENCY_ROOM,
    INPATIENT,
    OUTPATIENT,
    BoolArray,
    IntArray,
)
from coordinator.local.synth.people import _People, _Settings, _uniform_days
from coordinator.local.synth.rates import (
    _ACUTE_AGE_MULTIPLIER,
    _ACUTE_DEPRIVATION,
    _ACUTE_NORMALISER,
    _ADMIT_BY_AGE,
    _ADMIT_DEPRIVATION,
    _ADMIT_SEVERE,
    _CONDITIONS,
    _ELECTIVE_RATE,
    _EMERGENCY_RATE,
    _LOS_DEPRIVATION,
    _LOS_ELECTIVE,
    _LOS_MEAN_BY_AGE,
    _LOS_SEVERE,
    _MAX_LOS,
    _OUTPATIENT_RATE,
    _READMISSION_DAYS,
    _READMIT_BY_AGE,
    _READMIT_DEPRIVATION,
    _READMIT_ELECTIVE,
    _READMIT_EMERGENCY,
    _READMIT_MEAN_GAP,
    _READMIT_SEVERE,
    _RECORDS_EXTRA_MEAN,
    _SAME_DAY_BY_AGE,
)


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
