"""Reading query specs (queries.spec_io): from_dict and from_json, round trips, garbage.

Errors name the bad field; round trips through the dict and the canonical JSON give the
same query back; and arbitrary JSON-like input raises nothing but a QueryError.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queries import spec, spec_io
from queries.errors import QueryError
from queries.spec import SPEC_VERSION, Filter, Measure, Query, Statistic

# ---- from_dict / from_json ------------------------------------------------------------------


def test_from_dict_full_spec() -> None:
    q = spec_io.from_dict(
        {
            "version": SPEC_VERSION,
            "view": "asthma_children",
            "rho": 0.05,
            "measures": [{"statistic": "count", "name": "n"}],
            "group_by": ["sex", "age_band"],
            "where": [{"column": "deceased", "values": ["no"]}],
        }
    )
    assert q == Query(
        view="asthma_children",
        rho=0.05,
        measures=(Measure(Statistic.COUNT, "n"),),
        group_by=("sex", "age_band"),
        where=(Filter("deceased", ("no",)),),
    )


def test_from_dict_shorthands() -> None:
    q = spec_io.from_dict(
        {"view": "persons", "rho": 1, "measures": [{}], "where": {"sex": "female", "year": 2020}}
    )
    assert q.measures == (Measure(),)
    assert q.where == (Filter("sex", ("female",)), Filter("year", ("2020",)))


@pytest.mark.parametrize("data", [None, [], "persons", 1, b"{}"])
def test_from_dict_needs_a_mapping(data: object) -> None:
    with pytest.raises(QueryError, match="mapping"):
        spec_io.from_dict(data)


def test_unknown_fields_are_named_with_the_known_ones() -> None:
    with pytest.raises(QueryError, match="unknown field") as info:
        spec_io.from_dict({"veiw": "persons", "view": "persons", "rho": 0.1, "groupby": ["sex"]})
    message = str(info.value)
    assert "'groupby'" in message
    assert "'veiw'" in message
    assert "'group_by'" in message  # the known names, so the analyst can spot the typo


def test_non_string_keys_are_a_query_error() -> None:
    # BUG: from_dict sorts the unknown keys; keys of mixed types (which YAML produces, e.g.
    # `1: x`) make sorted() raise TypeError instead of a QueryError.
    with pytest.raises(QueryError, match="unknown field"):
        spec_io.from_dict({"view": "persons", "rho": 0.1, 1: "x", "extra": 2})


def test_missing_view_and_rho_are_named() -> None:
    with pytest.raises(QueryError, match="no 'view'"):
        spec_io.from_dict({"rho": 0.1})
    with pytest.raises(QueryError, match="no 'rho'"):
        spec_io.from_dict({"view": "persons"})


@pytest.mark.parametrize("version", ["chc.query/2", "", None, 1, ["chc.query/1"]])
def test_wrong_version_is_refused(version: object) -> None:
    with pytest.raises(QueryError, match="version"):
        spec_io.from_dict({"version": version, "view": "persons", "rho": 0.1})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("measures", {"statistic": "count"}, "'measures' must be a list"),
        ("measures", ["count"], r"measures\[0\] must be a mapping"),
        ("measures", [{"statistic": "no_such_statistic"}], "not supported"),
        ("measures", [{"statistic": ["count"]}], "not supported"),
        ("measures", [], "no measures"),
        ("group_by", "sex", "'group_by' must be a list"),
        ("group_by", [["sex"]], "group-by column"),
        ("where", "sex", "'where' must be a list or Mapping"),
        ("where", [{"column": "sex"}], r"where\[0\] must be a mapping"),
        ("where", [["sex", "female"]], r"where\[0\] must be a mapping"),
        ("where", [{"column": "sex", "values": {"a": 1}}], "must be a list"),
        ("where", [{"column": "sex", "values": []}], "no values"),
        ("where", [{"column": 1, "values": ["x"]}], "filter column"),
        ("rho", "0.1", "rho must be a finite number"),
        ("view", None, "not a valid name"),
    ],
)
def test_from_dict_errors_name_the_field(field: str, value: object, match: str) -> None:
    data: dict[str, Any] = {"view": "persons", "rho": 0.1, field: value}
    with pytest.raises(QueryError, match=match):
        spec_io.from_dict(data)


@pytest.mark.parametrize("raw", ["", "{", "not json", b"\xff\xfe\x00", "[1, 2", "{'a': 1}"])
def test_from_json_refuses_invalid_json(raw: str | bytes) -> None:
    with pytest.raises(QueryError, match="not valid JSON"):
        spec_io.from_json(raw)


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"a":' * 100_000])
def test_from_json_refuses_deeply_nested_input(raw: str) -> None:
    # BUG: json.loads raises RecursionError on deep nesting, which from_json does not catch.
    with pytest.raises(QueryError):
        spec_io.from_json(raw)


def test_from_json_accepts_bytes_and_str() -> None:
    raw = '{"view": "persons", "rho": 0.5}'
    assert spec_io.from_json(raw) == spec_io.from_json(raw.encode()) == Query("persons", 0.5)


# ---- Hypothesis: round trips and garbage -----------------------------------------------------

identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True)
rhos = st.floats(min_value=1e-12, max_value=1e3, allow_nan=False, allow_infinity=False) | (
    st.integers(min_value=1, max_value=10**3)
)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def measures(draw: st.DrawFn, name: str) -> Measure:
    """A valid measure of any statistic, with the options that statistic takes."""
    stat = draw(st.sampled_from(list(Statistic)))
    kwargs: dict[str, Any] = {}
    if stat not in {Statistic.COUNT, Statistic.COUNT_ROWS}:
        kwargs["column"] = draw(
            identifiers if stat is not Statistic.RATIO else st.none() | identifiers
        )
        lo = draw(finite)
        if draw(st.booleans()):
            kwargs["clamp"] = (lo, lo + draw(st.floats(min_value=1e-3, max_value=1e6)))
    if stat is Statistic.RATIO:
        kwargs["denominator"] = draw(st.none() | identifiers)
    if stat is Statistic.QUANTILE:
        kwargs["quantile"] = draw(st.floats(min_value=0.01, max_value=0.99))
    if stat in {Statistic.QUANTILE, Statistic.HISTOGRAM}:
        kwargs["bins"] = draw(st.none() | st.integers(min_value=2, max_value=1000))
    kwargs["weight"] = draw(st.just(1.0) | st.floats(min_value=0.01, max_value=100))
    return Measure(statistic=stat, name=name, **kwargs)


@st.composite
def queries(draw: st.DrawFn) -> Query:
    names = draw(st.lists(identifiers, min_size=1, max_size=3, unique=True))
    columns = draw(st.lists(identifiers, max_size=3, unique=True))
    filtered = draw(st.lists(identifiers, max_size=3, unique=True))
    where = tuple(
        Filter(c, tuple(draw(st.lists(st.text(max_size=8), min_size=1, max_size=4))))
        for c in filtered
    )
    return Query(
        view=draw(identifiers),
        rho=draw(rhos),
        measures=tuple(draw(measures(n)) for n in names),
        group_by=tuple(columns),
        where=where,
    )


@settings(max_examples=60)
@given(queries())
def test_round_trip_through_dict(q: Query) -> None:
    assert spec_io.from_dict(q.to_dict()) == q


@settings(max_examples=60)
@given(queries())
def test_round_trip_through_canonical_json(q: Query) -> None:
    raw = spec.canonical_bytes(q)
    back = spec_io.from_json(raw)
    assert back == q
    assert spec.canonical_bytes(back) == raw
    assert spec_io.from_json(raw.decode()) == q


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 0, -1])
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["persons", "count", "sex", SPEC_VERSION, "female"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
spec_fields = st.sampled_from(["version", "view", "rho", "measures", "group_by", "where"])
near_specs = st.dictionaries(spec_fields | st.text(max_size=6), json_values, max_size=7)
structured_specs = st.fixed_dictionaries(
    {"view": identifiers | json_values, "rho": rhos | json_values},
    optional={
        "measures": st.lists(
            st.fixed_dictionaries({}, optional={"statistic": json_values, "name": json_values})
            | json_values,
            max_size=3,
        )
        | json_values,
        "group_by": st.lists(identifiers | json_values, max_size=3) | json_values,
        "where": st.lists(
            st.fixed_dictionaries(
                {"column": identifiers | json_values, "values": json_values},
            )
            | json_values,
            max_size=3,
        )
        | st.dictionaries(identifiers, json_values, max_size=3)
        | json_values,
        "version": st.just(SPEC_VERSION) | json_values,
    },
)


def only_query_errors(parse: Any, data: object) -> None:
    """parse(data) returns a Query or raises QueryError, and nothing else."""
    try:
        result = parse(data)
    except QueryError:
        return
    assert isinstance(result, Query)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | near_specs | structured_specs)
def test_garbage_to_from_dict_raises_only_query_errors(data: object) -> None:
    only_query_errors(spec_io.from_dict, data)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=64)
    | st.text(max_size=64)
    | (json_values | near_specs | structured_specs).map(json.dumps)
)
def test_garbage_to_from_json_raises_only_query_errors(raw: bytes | str) -> None:
    only_query_errors(spec_io.from_json, raw)
