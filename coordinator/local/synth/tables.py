"""Turning one chunk's drawn persons and events into OMOP Arrow tables.

Holds a builder per table (person, observation_period, visit_occurrence,
condition_occurrence, death) that maps the numpy arrays of a chunk onto the table's schema,
adding ids, concept ids and nulls. It is separate because it is pure format conversion: the
drawing decides what happened, this decides how OMOP records it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coordinator.local.synth.care_sites import _ids
from coordinator.local.synth.events import _Conditions, _Visits
from coordinator.local.synth.omop import (
    _DATE,
    _I64,
    EHR_TYPE,
    FEMALE,
    MALE,
    SCHEMAS,
    IntArray,
    _const,
    _date_array,
    _int_array,
)
from coordinator.local.synth.people import _People
from coordinator.local.synth.rates import _CAUSE_SHARE, _CONDITIONS, _COPD_INDEX, _LIVER_INDEX


def _person_table(people: _People, person_id: IntArray, home: IntArray) -> pa.Table:
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
            _ids(home),
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


def _visit_table(visits: _Visits, first_person_id: int, sites: IntArray) -> pa.Table:
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
            _ids(sites),
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
