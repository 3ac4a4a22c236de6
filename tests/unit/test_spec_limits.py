"""Bounded work per spec (queries.spec): size, depth and count limits, YAML aliases, short
error messages, and the public ranges of every number a query carries."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import yaml

from queries import spec, spec_io
from queries.errors import QueryError
from queries.spec import Measure, Query, Statistic

# Limits on the cost of a refusal, generous for a shared 2-core machine.
FAST_S = 1.0
SMALL_BYTES = 16 * 1024 * 1024


@contextmanager
def bounded(seconds: float = FAST_S, peak_bytes: int = SMALL_BYTES) -> Iterator[None]:
    """The block finishes within `seconds` and allocates at most `peak_bytes` at its peak."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert peak < peak_bytes, f"peaked at {peak / 1e6:.1f} MB"


def refused(parse: Callable[[Any], Query], data: object, match: str) -> str:
    """parse(data) raises a QueryError matching `match`; returns its message."""
    with pytest.raises(QueryError, match=match) as info:
        parse(data)
    message = str(info.value)
    assert len(message) < 1000, message[:2000]
    return message


# ---- quoting --------------------------------------------------------------------------------


def test_quote_is_short_and_marks_the_cut() -> None:
    assert spec.quote("persons") == "'persons'"
    long = spec.quote("x" * 1_000_000)
    assert len(long) <= spec.QUOTE_CHARS
    assert long.startswith("'xxx")
    assert long.endswith("...")
    assert len(spec.quote(b"\xff" * 5_000_000)) <= spec.QUOTE_CHARS
    assert len(spec.quote(10**5000)) <= spec.QUOTE_CHARS  # beyond int's str limit
    assert len(spec.quote("x" * 500, 20)) == 20


def test_quote_does_not_expand_shared_references() -> None:
    bomb: list[object] = ["lol"]
    for _ in range(30):  # nominally 9**30 strings
        bomb = [bomb] * 9
    with bounded(seconds=0.5, peak_bytes=1024 * 1024):
        text = spec.quote(bomb)
    assert len(text) <= spec.QUOTE_CHARS


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"view": "v" * 5_000_000, "rho": 0.1}, "view 'vvv.*not a valid name"),
        ({"view": "persons", "rho": "0" * 5_000_000}, "rho must be a finite number"),
        ({"view": "persons", "rho": 0.1, "group_by": ["s" * 5_000_000]}, "group-by column"),
        ({"view": "persons", "rho": 0.1, "version": "v" * 5_000_000}, "spec version"),
        ({"view": "persons", "rho": 0.1, "k" * 5_000_000: 1}, "unknown field"),
        (
            {"view": "persons", "rho": 0.1, "measures": [{"statistic": "s" * 5_000_000}]},
            "is not supported",
        ),
        (
            {"view": "persons", "rho": 0.1, "measures": [{"column": "c" * 5_000_000}]},
            "measure name 'count_ccc",
        ),
        (
            {
                "view": "persons",
                "rho": 0.1,
                "measures": [{"statistic": "sum", "column": [1] * 999}],
            },
            "column",
        ),
    ],
    ids=["view", "rho", "group_by", "version", "key", "statistic", "column", "list-column"],
)
def test_rejected_values_are_quoted_short(data: dict[str, Any], match: str) -> None:
    message = refused(spec_io.from_dict, data, match)
    assert len(message) < 600, message


def test_many_unknown_fields_are_summarised() -> None:
    data: dict[str, object] = {"view": "persons", "rho": 0.1}
    data.update({f"junk{i}": i for i in range(5_000)})
    message = refused(spec_io.from_dict, data, r"unknown field.*and 4990 more")
    assert "'junk0'" in message


# ---- size, depth and counts -----------------------------------------------------------------


def test_a_large_json_spec_is_refused_before_parsing() -> None:
    padding = " " * (spec_io.MAX_SPEC_BYTES + 1)
    raw = '{"view": "persons", "rho": 0.1}' + padding
    refused(spec_io.from_json, raw, "larger than 256 KB")
    refused(spec_io.from_json, raw.encode(), "larger than 256 KB")
    # Characters are not bytes: 100,000 three-byte characters are 300 KB.
    refused(spec_io.from_json, json.dumps({"view": "\u20ac" * 100_000}, ensure_ascii=False), "KB")
    assert spec_io.from_json('{"view": "persons", "rho": 0.1}' + " " * 1000) == Query(
        "persons", 0.1
    )


def test_a_50_mb_spec_is_refused_at_once() -> None:
    raw = b'{"view": "persons", "rho": 0.1, "group_by": ["' + b"x" * 50_000_000 + b'"]}'
    with bounded(peak_bytes=1024 * 1024):
        refused(spec_io.from_json, raw, "larger than")
    with bounded(peak_bytes=1024 * 1024):
        refused(spec_io.from_yaml, raw, "larger than")


def test_five_million_filter_values_are_refused_quickly() -> None:
    values = ["female"] * 5_000_000
    where = [{"column": "sex", "values": values}]
    raw = json.dumps({"view": "persons", "rho": 0.1, "where": where})
    assert len(raw) > 40_000_000
    with bounded(peak_bytes=1024 * 1024):
        refused(spec_io.from_json, raw, "larger than")
    # Already parsed (e.g. by a caller's own loader): refused by its count, before any of the
    # values is looked at or copied.
    with bounded(seconds=0.5, peak_bytes=2 * 1024 * 1024):
        refused(spec_io.from_dict, {"view": "persons", "rho": 0.1, "where": where}, "more than")
    with bounded(seconds=0.5, peak_bytes=2 * 1024 * 1024):
        refused(
            spec_io.from_dict, {"view": "persons", "rho": 0.1, "where": {"sex": values}}, "more"
        )


def test_a_filter_over_its_value_limit_is_refused_by_count() -> None:
    too_many = {"sex": [str(i) for i in range(spec.MAX_FILTER_VALUES + 1)]}
    refused(spec_io.from_dict, {"view": "persons", "rho": 0.1, "where": too_many}, "more than 1000")
    fine = {"sex": [str(i) for i in range(spec.MAX_FILTER_VALUES)]}
    assert len(
        spec_io.from_dict({"view": "persons", "rho": 0.1, "where": fine}).where[0].values
    ) == (spec.MAX_FILTER_VALUES)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("measures", [{}] * (spec.MAX_MEASURES + 1), "more than the limit of 50"),
        ("group_by", [f"c{i}" for i in range(spec.MAX_GROUP_BY + 1)], "more than 20 columns"),
        ("where", [{"column": f"c{i}", "values": ["x"]} for i in range(51)], "more than 50"),
    ],
)
def test_counts_are_checked_before_building(field: str, value: object, match: str) -> None:
    refused(spec_io.from_dict, {"view": "persons", "rho": 0.1, field: value}, match)


def test_deep_nesting_is_refused() -> None:
    deep: object = 1
    for _ in range(spec_io.MAX_SPEC_DEPTH):
        deep = [deep]
    raw = json.dumps({"view": "persons", "rho": 0.1, "measures": deep})
    refused(spec_io.from_json, raw, "nests lists and mappings more than 8 deep")
    refused(spec_io.from_yaml, raw, "nests lists and mappings more than 8 deep")
    refused(spec_io.from_json, "[" * 100_000, "nested too deeply|nests")


def test_the_fullest_legitimate_spec_fits_every_limit() -> None:
    measures = [
        {"statistic": "quantile", "name": f"m{i}", "column": "age", "quantile": 0.5,
         "clamp": [0, 120], "bins": 100, "weight": 2.0}
        for i in range(spec.MAX_MEASURES)
    ]  # fmt: skip
    where = [
        {"column": f"c{j}", "values": [f"value-{i:04d}" for i in range(spec.MAX_FILTER_VALUES)]}
        for j in range(3)
    ]
    data = {"view": "persons", "rho": 0.5, "measures": measures, "where": where}
    raw = json.dumps(data)
    assert len(raw) < spec_io.MAX_SPEC_BYTES
    query = spec_io.from_json(raw)
    assert spec_io.from_yaml(yaml.safe_dump(data)) == query


# ---- YAML -----------------------------------------------------------------------------------

_LOL = '["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
# The billion laughs: nine levels of nine aliases of the level below.
BOMB = "\n".join(
    ["view: persons", "rho: 0.1", f"a: &a {_LOL}"]
    + [
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    + ["group_by: [*i, *i, *i]"]
)


def test_a_yaml_alias_bomb_is_refused_fast_and_small() -> None:
    with bounded(seconds=0.5, peak_bytes=2 * 1024 * 1024):
        refused(spec_io.from_yaml, BOMB, "anchors and aliases")
    # Loaded by the plain safe loader (shared references, 3 * 9**9 nominal strings) and given
    # to from_dict, it is refused by its size without being expanded.
    data = yaml.safe_load(BOMB)
    with bounded(seconds=0.5, peak_bytes=2 * 1024 * 1024):
        refused(spec_io.from_dict, data, "unknown field|more than")
    data = {"view": "persons", "rho": 0.1, "group_by": data["group_by"]}
    with bounded(seconds=0.5, peak_bytes=2 * 1024 * 1024):
        refused(spec_io.from_dict, data, "nests lists and mappings more than 8 deep")
    # Shallow but wide: a million nominal values in a structure of shared references.
    wide = {"view": "persons", "rho": 0.1, "group_by": [["sex"] * 1000] * 1000}
    with bounded(seconds=0.5, peak_bytes=2 * 1024 * 1024):
        refused(spec_io.from_dict, wide, "more than 20000 values")


@pytest.mark.parametrize(
    "text",
    [
        "view: &v persons\nrho: 0.1\n",
        "base: &b {view: persons}\n<<: *b\nrho: 0.1\n",
        "view: persons\nrho: !!python/object:os.system ls\n",
        "view: [persons\n",
    ],
    ids=["anchor", "merge", "python-tag", "syntax"],
)
def test_unsafe_or_broken_yaml_is_a_query_error(text: str) -> None:
    refused(spec_io.from_yaml, text, "YAML")


def test_a_yaml_spec_parses() -> None:
    text = "view: persons\nrho: 0.1\ngroup_by: [sex]\nwhere: {deceased: no_such}\n"
    assert spec_io.from_yaml(text) == spec_io.from_dict(
        {"view": "persons", "rho": 0.1, "group_by": ["sex"], "where": {"deceased": "no_such"}}
    )
    assert spec_io.from_yaml(text.encode()) == spec_io.from_yaml(text)


# ---- number ranges --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"rho": 1e-320}, r"rho must be between 1e-12 and 1000, got 1e-320"),
        ({"rho": 1e-13}, r"rho must be between 1e-12 and 1000"),
        ({"rho": 1e308}, r"rho must be between 1e-12 and 1000, got 1e\+308"),
        ({"rho": 1001}, r"rho must be between 1e-12 and 1000"),
        # Within :g's six digits of the limit: still printed apart from it.
        ({"rho": 1000.0001}, r"rho must be between 1e-12 and 1000, got 1000\.0001"),
        ({"rho": -1}, r"rho must be between"),
        ({"epsilon": 1e308}, r"epsilon must be between 1e-06 and 1000, got 1e\+308"),
        ({"epsilon": 0}, r"epsilon must be between 1e-06 and 1000"),
        ({"epsilon": 1.0, "delta": 1e-320}, r"delta must be between 1e-30 and 0.1"),
        ({"epsilon": 1.0, "delta": 0.5}, r"delta must be between 1e-30 and 0.1, got 0.5"),
        (
            {"epsilon": 1e-6, "delta": 1e-6},
            r"epsilon 1e-06 at delta 1e-06 is rho .*, below the smallest rho",
        ),
    ],
)
def test_budget_numbers_have_public_ranges(data: dict[str, object], match: str) -> None:
    refused(spec_io.from_dict, {"view": "persons", **data}, match)


def test_the_ends_of_the_budget_ranges_are_accepted() -> None:
    assert Query("persons", 1e-12).rho == 1e-12
    assert Query("persons", 1e3).rho == 1e3
    assert spec_io.from_dict({"view": "persons", "epsilon": 1e3, "delta": 1e-30}).rho < 1e3
    assert spec_io.from_dict({"view": "persons", "epsilon": 1.0, "delta": 0.1}).rho > 0


@pytest.mark.parametrize(
    ("measure", "match"),
    [
        ({"weight": 1e-13}, r"weight must be between 1e-12 and 1e\+12, got 1e-13"),
        ({"weight": 1e13}, r"weight must be between 1e-12 and 1e\+12"),
        ({"weight": 1e-320}, r"weight must be between"),
        (
            {"statistic": "sum", "column": "age", "clamp": [0, 1e16]},
            r"clamp upper bound must be between -1e\+15 and 1e\+15, got 1e\+16",
        ),
        (
            {"statistic": "sum", "column": "age", "clamp": [-1e300, 0]},
            r"clamp lower bound must be between",
        ),
        (
            {"statistic": "quantile", "column": "age", "quantile": -0.1},
            r"the quantile must be between 0 and 1 \(exclusive\), got -0.1",
        ),
        (
            {"statistic": "quantile", "column": "age", "quantile": 1e308},
            r"the quantile must be between 0 and 1",
        ),
    ],
)
def test_measure_numbers_have_public_ranges(measure: dict[str, object], match: str) -> None:
    refused(spec_io.from_dict, {"view": "persons", "rho": 0.1, "measures": [measure]}, match)


def test_a_bad_quantile_level_is_named_before_the_name_derived_from_it() -> None:
    with pytest.raises(QueryError, match="the quantile must be between 0 and 1"):
        Measure(Statistic.QUANTILE, name="q-10_age", column="age", quantile=-0.1)
    with pytest.raises(QueryError, match="not a valid name"):
        Measure(Statistic.QUANTILE, name="q-10_age", column="age", quantile=0.1)
