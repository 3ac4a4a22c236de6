"""The immutable query model: what an analyst asks, independent of transport and SQL.

A query is a tree of frozen dataclasses validated on construction (Tumult style). Checks
that need the node's catalog (does the view exist, is the column public) live in plan.py.
The canonical encoding is what analysts sign, so it must be deterministic.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols.errors import QueryError

SPEC_VERSION = "chc.query/1"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# A spec with more than this many filter values is almost certainly a mistake or an attack.
MAX_FILTER_VALUES = 1000


def check_identifier(value: object, what: str) -> str:
    """Return value if it is a lower-case SQL identifier, else raise a QueryError naming it."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise QueryError(
            f"{what} {value!r} is not a valid name: use lower-case letters, digits and '_', "
            "starting with a letter"
        )
    return value


class Statistic(enum.StrEnum):
    """The aggregate a measure computes."""

    COUNT = "count"  # number of distinct persons


@dataclass(frozen=True)
class Measure:
    """One aggregate in the output, e.g. the number of distinct persons."""

    statistic: Statistic = Statistic.COUNT
    name: str = "count"

    def __post_init__(self) -> None:
        if not isinstance(self.statistic, Statistic):
            raise QueryError(
                f"unknown statistic {self.statistic!r}; supported: "
                + ", ".join(s.value for s in Statistic)
            )
        check_identifier(self.name, "measure name")


@dataclass(frozen=True)
class Filter:
    """Keep rows whose public column takes one of the listed values."""

    column: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        check_identifier(self.column, "filter column")
        if not self.values:
            raise QueryError(f"filter on {self.column!r} lists no values; give at least one")
        if len(self.values) > MAX_FILTER_VALUES:
            raise QueryError(
                f"filter on {self.column!r} lists more than {MAX_FILTER_VALUES} values"
            )
        if not all(isinstance(v, str) for v in self.values):
            raise QueryError(f"filter values on {self.column!r} must be strings")


@dataclass(frozen=True)
class Query:
    """A DP aggregate query over one view, charged rho (zCDP) at every node."""

    view: str
    rho: float
    measures: tuple[Measure, ...] = (Measure(),)
    group_by: tuple[str, ...] = ()
    where: tuple[Filter, ...] = field(default=())

    def __post_init__(self) -> None:
        check_identifier(self.view, "view")
        if isinstance(self.rho, bool) or not isinstance(self.rho, int | float):
            raise QueryError(f"rho must be a number, got {self.rho!r}")
        if not math.isfinite(self.rho) or self.rho <= 0:
            raise QueryError(f"rho must be a positive finite number, got {self.rho!r}")
        if not self.measures:
            raise QueryError("the query has no measures; ask for at least one, e.g. count")
        names = [m.name for m in self.measures]
        if len(set(names)) != len(names):
            raise QueryError(f"measure names must be unique, got {names}")
        for col in self.group_by:
            check_identifier(col, "group-by column")
        if len(set(self.group_by)) != len(self.group_by):
            raise QueryError(f"group-by columns repeat: {list(self.group_by)}")
        filtered = [f.column for f in self.where]
        if len(set(filtered)) != len(filtered):
            raise QueryError(f"filter columns repeat: {filtered}; put all values in one filter")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; from_dict(to_dict(q)) == q."""
        return {
            "version": SPEC_VERSION,
            "view": self.view,
            "rho": self.rho,
            "measures": [{"statistic": m.statistic.value, "name": m.name} for m in self.measures],
            "group_by": list(self.group_by),
            "where": [{"column": f.column, "values": list(f.values)} for f in self.where],
        }


def canonical_bytes(query: Query) -> bytes:
    """The deterministic encoding of a query that analysts sign and ledgers hash."""
    return json.dumps(query.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def _expect(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(key, default)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise QueryError(f"field {key!r} must be a {names}, got {type(value).__name__}")
    return value


def from_dict(data: object) -> Query:
    """Build a Query from a parsed JSON/YAML spec, with errors that name the bad field."""
    if not isinstance(data, Mapping):
        raise QueryError("a query spec must be a mapping with at least 'view' and 'rho'")
    known = {"version", "view", "rho", "measures", "group_by", "where"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise QueryError(f"unknown field(s) {unknown} in query spec; known: {sorted(known)}")
    version = data.get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise QueryError(f"unsupported spec version {version!r}; this node speaks {SPEC_VERSION}")
    if "view" not in data:
        raise QueryError("query spec has no 'view'; name the view to query")
    if "rho" not in data:
        raise QueryError("query spec has no 'rho'; give the privacy budget, e.g. rho: 0.01")
    raw_measures = _expect(data, "measures", list, [{"statistic": "count"}])
    measures = []
    for i, m in enumerate(raw_measures):
        if not isinstance(m, Mapping):
            raise QueryError(f"measures[{i}] must be a mapping like {{statistic: count}}")
        stat = m.get("statistic", "count")
        try:
            statistic = Statistic(stat)
        except ValueError:
            raise QueryError(
                f"measures[{i}].statistic {stat!r} is not supported; supported: "
                + ", ".join(s.value for s in Statistic)
            ) from None
        measures.append(Measure(statistic=statistic, name=m.get("name", statistic.value)))
    where = []
    raw_where = _expect(data, "where", (list, Mapping), [])
    items = raw_where.items() if isinstance(raw_where, Mapping) else None
    if items is not None:
        raw_where = [{"column": k, "values": v} for k, v in items]
    for i, f in enumerate(raw_where):
        if not isinstance(f, Mapping) or "column" not in f or "values" not in f:
            raise QueryError(f"where[{i}] must be a mapping with 'column' and 'values'")
        values = f["values"]
        if isinstance(values, str | int):
            values = [values]
        if not isinstance(values, list):
            raise QueryError(f"where[{i}].values must be a list of values")
        where.append(Filter(column=f["column"], values=tuple(str(v) for v in values)))
    group_by = _expect(data, "group_by", list, [])
    return Query(
        view=data["view"],
        rho=data["rho"],
        measures=tuple(measures),
        group_by=tuple(group_by),
        where=tuple(where),
    )


def from_json(raw: bytes | str) -> Query:
    """Parse a JSON spec (e.g. the canonical bytes in an envelope) into a Query."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise QueryError(f"query is not valid JSON: {exc}") from None
    return from_dict(data)
