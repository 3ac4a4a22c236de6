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

from coordinator.local.synth import intervention
from coordinator.local.synth.known import _Known
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
    _COPD_INDEX,
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

_INTERVENTION_INDEX = [c.concept_id for c in _CONDITIONS].index(
    intervention.INTERVENTION.concept_id
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
    # The known model (known.py): visits on which COPD is never recorded (the window's
    # emergency stays of pathway persons drawn not admitted, and the attendances before
    # them), and stays of which one must carry it (those drawn admitted).
    quiet: BoolArray
    carrier: BoolArray


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


def _draw_visits(
    rng: np.random.Generator, people: _People, s: _Settings, first_id: int, known: _Known
) -> _Visits:
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

    # The known model (known.py): a pathway person drawn to be admitted who has no emergency
    # admission in the window gets one, an attendance and the stay it leads to.
    has_one = np.zeros(n, dtype=np.bool_)
    has_one[ad_who[ad_start >= known.window_start]] = True
    kn_who = np.flatnonzero(known.yes & ~has_one).astype(np.int64)
    kn_start = _uniform_days(
        rng, np.maximum(people.window_lo[kn_who], known.window_start), people.end[kn_who]
    )
    kn_end = np.minimum(kn_start + _los(rng, people, kn_who), people.end[kn_who])
    admitted = np.concatenate([admitted, er_who.shape[0] + np.arange(kn_who.shape[0])])
    er_who = np.concatenate([er_who, kn_who])
    er_start = np.concatenate([er_start, kn_start])
    ad_who = np.concatenate([ad_who, kn_who])
    ad_start = np.concatenate([ad_start, kn_start])
    ad_end = np.concatenate([ad_end, kn_end])

    # The known intervention (intervention.py): some stays avoided, in one region only.
    has_asthma = people.flags[_INTERVENTION_INDEX]
    ad_kept = intervention.kept(rng, s.region, people.birth, has_asthma, ad_who, ad_start)
    el_kept = intervention.kept(rng, s.region, people.birth, has_asthma, el_who, el_start)
    admitted, ad_who, ad_start, ad_end = (a[ad_kept] for a in (admitted, ad_who, ad_start, ad_end))
    el_who, el_start, el_end = (a[el_kept] for a in (el_who, el_start, el_end))

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
    person, kinds, starts = who[order], concept[order], start[order]
    quiet, carrier = _known_marks(person, kinds, starts, sorted_preceding, known)
    return _Visits(
        person_index=person,
        concept=kinds,
        start=starts,
        end=end[order],
        preceding=sorted_preceding,
        ids=first_id + np.arange(order.shape[0], dtype=np.int64),
        quiet=quiet,
        carrier=carrier,
    )


# Day numbers fit in 32 bits: person * _DAY_KEY + day orders by person, then day.
_DAY_KEY = np.int64(1 << 32)


def _sorted_contains(sorted_keys: IntArray, keys: IntArray) -> BoolArray:
    at = np.minimum(np.searchsorted(sorted_keys, keys), max(sorted_keys.shape[0] - 1, 0))
    out: BoolArray = (sorted_keys.shape[0] > 0) & (sorted_keys[at] == keys)
    return out


def _known_marks(
    person: IntArray, concept: IntArray, start: IntArray, preceding: IntArray, known: _Known
) -> tuple[BoolArray, BoolArray]:
    """The visits `quiet` and `carrier` of _Visits (sorted by person, then start)."""
    in_window = (concept == INPATIENT) & (start >= known.window_start)
    carrier = in_window & (preceding >= 0) & known.yes[person]
    # The node counts a stay as an emergency admission if an emergency attendance precedes
    # it or falls on its first day or the day before (node/data/views.py, b_acute).
    ed_keys = person[concept == EMERGENCY_ROOM] * _DAY_KEY + start[concept == EMERGENCY_ROOM]
    stays = np.flatnonzero(in_window & known.no[person])
    stay_keys = person[stays] * _DAY_KEY + start[stays]
    emergency = (
        (preceding[stays] >= 0)
        | _sorted_contains(ed_keys, stay_keys)
        | _sorted_contains(ed_keys, stay_keys - 1)
    )
    quiet = np.zeros(person.shape[0], dtype=np.bool_)
    quiet[stays[emergency]] = True
    before = preceding[stays[emergency]]
    quiet[before[before >= 0]] = True
    return quiet, carrier


@dataclass(frozen=True)
class _Conditions:
    person_index: IntArray
    kind: IntArray  # index into _CONDITIONS
    start: IntArray
    visit_id: IntArray  # -1 for none
    ids: IntArray


def _draw_conditions(
    rng: np.random.Generator, people: _People, visits: _Visits, first_id: int, known: _Known
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
        day = _uniform_days(rng, people.obs_start[who], people.end[who])
        visit_parts.append(np.full(who.shape[0], -1, dtype=np.int64))
        # Records on acute visits (any diagnosis position), on the visit's first day.
        link = people.flags[k][acute_person] & (rng.random(acute.shape[0]) < cond.link_probability)
        if k == _COPD_INDEX:
            day = _outside_quiet_stays(rng, people, visits, known, who, day)
            link = _known_links(visits, acute, link)
        start_parts.append(day)
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


def _known_links(visits: _Visits, acute: IntArray, link: BoolArray) -> BoolArray:
    """COPD's links to acute visits, arranged for the known model (known.py): none on a
    quiet visit, and for each person with carrier stays, one on a carrier stay (on the
    first, if chance put none on any of them or on the attendances before them)."""
    linked = np.zeros(visits.ids.shape[0], dtype=np.bool_)
    linked[acute[link & ~visits.quiet[acute]]] = True
    carriers = np.flatnonzero(visits.carrier)
    carried = linked[carriers] | linked[visits.preceding[carriers]]
    done = np.zeros(visits.person_index.shape[0], dtype=np.bool_)
    done[visits.person_index[carriers[carried]]] = True
    waiting = carriers[~done[visits.person_index[carriers]]]
    # Visits are sorted by person and start: a person's first carrier stay comes first.
    _, first = np.unique(visits.person_index[waiting], return_index=True)
    linked[waiting[first]] = True
    out: BoolArray = linked[acute]
    return out


def _outside_quiet_stays(
    rng: np.random.Generator,
    people: _People,
    visits: _Visits,
    known: _Known,
    who: IntArray,
    day: IntArray,
) -> IntArray:
    """Dates of COPD records outside hospital, none within a quiet stay (the node counts an
    unlinked record dated within an emergency stay as recorded on it): those that fall in
    one are dated again before the pathway's window (for reference dates from 2016 on)."""
    stays = np.flatnonzero(visits.quiet & (visits.concept == INPATIENT))
    if stays.shape[0] == 0:
        return day
    person = visits.person_index[stays]
    starts = person * _DAY_KEY + visits.start[stays]
    # A running maximum of the stays' last days: the keys order by person first, so it
    # never carries one person's stay into the next person's.
    reach = np.maximum.accumulate(person * _DAY_KEY + visits.end[stays])
    keys = who * _DAY_KEY + day
    at = np.searchsorted(starts, keys, side="right") - 1
    inside = (at >= 0) & (reach[np.maximum(at, 0)] >= keys)
    latest = np.full(who.shape[0], known.window_start - 1, dtype=np.int64)
    movable = np.flatnonzero(inside & (people.obs_start[who] <= latest))
    out = day.copy()
    out[movable] = _uniform_days(rng, people.obs_start[who[movable]], latest[movable])
    return out
