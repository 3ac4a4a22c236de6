"""Reading a query spec: a parsed mapping, JSON bytes or YAML text into a validated Query.

Specs arrive from analysts' files and from the wire, so everything here does bounded work
before the model in spec.py sees a value: the raw text is size-capped before any parser runs,
YAML anchors and aliases are refused while the document composes, and a parsed value is
refused if it nests too deep or holds too many values. It is separate from the model because
these limits guard the parsers, not the meaning of a query; errors name the bad field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from queries.cohort import cohort_from_dict
from queries.errors import QueryError
from queries.spec import (
    MAX_FILTER_VALUES,
    MAX_FILTERS,
    MAX_GROUP_BY,
    MAX_MEASURES,
    QUOTE_CHARS,
    SPEC_VERSION,
    Filter,
    Measure,
    Query,
    Statistic,
    quote,
    rho_from_epsilon,
)

# Bounded work per spec (docs/threat-model.md, "Bounded work"): a raw JSON or YAML spec is
# refused above MAX_SPEC_BYTES before it is parsed, and a parsed one above MAX_SPEC_DEPTH
# nested lists/mappings or MAX_SPEC_ITEMS values in all before anything is built from it. The
# largest legitimate spec (50 measures, a few filters of up to 1,000 short values) is a few
# tens of KB, nests 4 deep and holds a few thousand values.
MAX_SPEC_BYTES = 256 * 1024
MAX_SPEC_DEPTH = 8
MAX_SPEC_ITEMS = 20_000


def _expect(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(key, default)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise QueryError(f"field {key!r} must be a {names}, got {type(value).__name__}")
    return value


def _check_shape(data: object) -> None:
    """Refuse a parsed spec nested deeper than MAX_SPEC_DEPTH or holding more than
    MAX_SPEC_ITEMS values, visiting at most that many (shared references count each time)."""
    items = 0
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        items += 1
        if items > MAX_SPEC_ITEMS:
            raise QueryError(
                f"the query spec holds more than {MAX_SPEC_ITEMS} values; a query needs far fewer"
            )
        if isinstance(value, Mapping | list | tuple):
            if depth >= MAX_SPEC_DEPTH:
                raise QueryError(
                    f"the query spec nests lists and mappings more than {MAX_SPEC_DEPTH} deep"
                )
            if len(value) > MAX_SPEC_ITEMS:
                raise QueryError(
                    f"the query spec holds more than {MAX_SPEC_ITEMS} values; a query needs "
                    "far fewer"
                )
            children = (
                [v for kv in value.items() for v in kv] if isinstance(value, Mapping) else value
            )
            stack.extend((child, depth + 1) for child in children)


def _names(keys: set[Any], shown: int = 10) -> str:
    """Some unknown keys, each quoted and in order, for an error message ("" for none)."""
    if not keys:
        return ""
    names = sorted(quote(k, 60) for k in keys)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return "[" + ", ".join(names[:shown]) + "]" + more


def from_dict(data: object) -> Query:
    """Build a Query from a parsed JSON/YAML spec, with errors that name the bad field."""
    if not isinstance(data, Mapping):
        raise QueryError("a query spec must be a mapping with at least 'view' and 'rho'")
    _check_shape(data)
    known = {"version", "view", "rho", "epsilon", "delta", "measures", "group_by", "where"}
    known |= {"rows_per_person", "cohort", "pooled_only", "honest_nodes"}
    unknown = _names(set(data) - known)
    if unknown:
        raise QueryError(f"unknown field(s) {unknown} in query spec; known: {sorted(known)}")
    version = data.get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise QueryError(
            f"unsupported spec version {quote(version)}; this node speaks {SPEC_VERSION}"
        )
    if "view" not in data:
        raise QueryError("query spec has no 'view'; name the view to query")
    if "delta" in data and "epsilon" not in data:
        raise QueryError("'delta' only goes with 'epsilon'; with rho, give no delta")
    if "rho" in data and "epsilon" in data:
        raise QueryError("give either 'rho' or 'epsilon' (with 'delta'), not both")
    if "epsilon" in data:
        rho = rho_from_epsilon(data["epsilon"], data.get("delta", 1e-6))
    elif "rho" in data:
        rho = data["rho"]
    else:
        raise QueryError("query spec has no 'rho'; give the privacy budget, e.g. rho: 0.01")
    raw_measures = _expect(data, "measures", list, [{"statistic": "count"}])
    if len(raw_measures) > MAX_MEASURES:
        raise QueryError(
            f"the query has {len(raw_measures)} measures, more than the limit of "
            f"{MAX_MEASURES}; split it into several queries"
        )
    measures = [_measure_from_dict(m, i) for i, m in enumerate(raw_measures)]
    where = []
    raw_where = _expect(data, "where", (list, Mapping), [])
    if len(raw_where) > MAX_FILTERS:
        raise QueryError(f"the query has more than {MAX_FILTERS} filters")
    items = raw_where.items() if isinstance(raw_where, Mapping) else None
    if items is not None:
        raw_where = [{"column": k, "values": v} for k, v in items]
    for i, f in enumerate(raw_where):
        if not isinstance(f, Mapping) or "column" not in f or "values" not in f:
            raise QueryError(f"where[{i}] must be a mapping with 'column' and 'values'")
        values = f["values"]
        if isinstance(values, str | int) and not isinstance(values, bool):
            values = [values]
        if isinstance(values, list) and len(values) > MAX_FILTER_VALUES:
            # Before looking at any value: the count alone decides.
            raise QueryError(f"where[{i}] lists more than {MAX_FILTER_VALUES} values")
        if not isinstance(values, list) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in values
        ):
            raise QueryError(f"where[{i}].values must be a list of strings (or whole numbers)")
        where.append(Filter(column=f["column"], values=tuple(str(v) for v in values)))
    group_by = _expect(data, "group_by", list, [])
    if len(group_by) > MAX_GROUP_BY:
        raise QueryError(f"the query groups by more than {MAX_GROUP_BY} columns")
    return Query(
        view=data["view"],
        rho=rho,
        measures=tuple(measures),
        group_by=tuple(group_by),
        where=tuple(where),
        rows_per_person=data.get("rows_per_person"),
        cohort=cohort_from_dict(data["cohort"]) if "cohort" in data else None,
        pooled_only=data.get("pooled_only", False),
        honest_nodes=data.get("honest_nodes"),
    )


_MEASURE_KEYS = frozenset(
    {"statistic", "name", "column", "denominator", "quantile", "bins", "clamp", "weight"}
)


def _measure_from_dict(m: object, i: int) -> Measure:
    if not isinstance(m, Mapping):
        raise QueryError(f"measures[{i}] must be a mapping like {{statistic: count}}")
    unknown = _names(set(m) - _MEASURE_KEYS)
    if unknown:
        raise QueryError(
            f"measures[{i}]: unknown field(s) {unknown}; known: {sorted(_MEASURE_KEYS)}"
        )
    stat = m.get("statistic", "count")
    if stat == "median":
        stat, m = "quantile", {**m, "quantile": m.get("quantile", 0.5)}
    try:
        statistic = Statistic(stat)
    except ValueError:
        raise QueryError(
            f"measures[{i}].statistic {quote(stat)} is not supported; supported: "
            + ", ".join(s.value for s in Statistic)
            + ", median"
        ) from None
    clamp = m.get("clamp")
    if clamp is not None:
        if not isinstance(clamp, list | tuple) or len(clamp) != 2:
            raise QueryError(f"measures[{i}].clamp must be [lower, upper]")
        clamp = (clamp[0], clamp[1])
    column = m.get("column")
    # Only a string goes into the default name: formatting anything else could expand it.
    default_name = f"{statistic.value}_{column}" if isinstance(column, str) else statistic.value
    return Measure(
        statistic=statistic,
        name=m.get("name", default_name),
        column=m.get("column"),
        denominator=m.get("denominator"),
        quantile=m.get("quantile"),
        bins=m.get("bins"),
        clamp=clamp,
        weight=m.get("weight", 1.0),
    )


def _check_size(raw: bytes | str, what: str) -> None:
    """Refuse a raw spec above MAX_SPEC_BYTES before any parser sees it."""
    size = len(raw)
    if isinstance(raw, str) and size <= MAX_SPEC_BYTES:
        size = len(raw.encode("utf-8", errors="surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise QueryError(
            f"the {what} query spec is larger than {MAX_SPEC_BYTES // 1024} KB; a query needs "
            "far less"
        )


def from_json(raw: bytes | str) -> Query:
    """Parse a JSON spec (e.g. the canonical bytes in an envelope) into a Query."""
    _check_size(raw, "JSON")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise QueryError(f"query is not valid JSON: {exc}") from None
    except RecursionError:
        raise QueryError("query JSON is nested too deeply") from None
    return from_dict(data)


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors or aliases, bounded while it composes.

    Aliases are how a small YAML file describes an exponentially large value; a query spec
    never needs one, so the first anchor or alias is refused before anything is built.
    """

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0
        self._items = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose one node, refusing anchors, aliases, deep nesting and too many values."""
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise QueryError(
                "YAML anchors and aliases (&name, *name) are not allowed in a query spec"
            )
        self._items += 1
        if self._items > MAX_SPEC_ITEMS:
            raise QueryError(
                f"the query spec holds more than {MAX_SPEC_ITEMS} values; a query needs far fewer"
            )
        nested = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_SPEC_DEPTH:
                raise QueryError(
                    f"the query spec nests lists and mappings more than {MAX_SPEC_DEPTH} deep"
                )
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1


def load_yaml(raw: bytes | str) -> object:
    """Parse a YAML (or JSON) spec file's text, with bounded work (no aliases, size cap)."""
    _check_size(raw, "YAML")
    loader = _SpecLoader(raw)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # PyYAML's message quotes the offending line: say only where, never what it holds.
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise QueryError(f"query spec is not valid YAML or JSON{where}") from None
    except yaml.YAMLError as exc:
        raise QueryError(
            f"query spec is not valid YAML: {quote(str(exc), 4 * QUOTE_CHARS)}"
        ) from None
    except RecursionError:
        raise QueryError("query YAML is nested too deeply") from None
    finally:
        loader.dispose()


def from_yaml(raw: bytes | str) -> Query:
    """Parse a YAML (or JSON) spec file's text into a Query, with bounded work."""
    return from_dict(load_yaml(raw))
