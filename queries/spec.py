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
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from queries.errors import QueryError

SPEC_VERSION = "chc.query/1"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# A spec with more than this many filter values is almost certainly a mistake or an attack.
MAX_FILTER_VALUES = 1000
# Every measure costs noise, SQL and transfer; more than this in one query is refused.
MAX_MEASURES = 50
# Group-by columns and filters name distinct public columns, of which a view has a handful.
MAX_GROUP_BY = 20
MAX_FILTERS = 50

# Bounded work per spec (docs/threat-model.md, "Bounded work"): a raw JSON or YAML spec is
# refused above MAX_SPEC_BYTES before it is parsed, and a parsed one above MAX_SPEC_DEPTH
# nested lists/mappings or MAX_SPEC_ITEMS values in all before anything is built from it. The
# largest legitimate spec (50 measures, a few filters of up to 1,000 short values) is a few
# tens of KB, nests 4 deep and holds a few thousand values.
MAX_SPEC_BYTES = 256 * 1024
MAX_SPEC_DEPTH = 8
MAX_SPEC_ITEMS = 20_000
# Error messages quote at most this many characters of a rejected value.
QUOTE_CHARS = 200

# The public ranges of the numbers a query carries (docs/threat-model.md, "Bounded work"). rho:
# below 1e-12 the noise swamps any count (sigma > 700,000) and denormal values overflow the
# calibration; above 1e3 no node's cap is anywhere near. delta only converts epsilon to rho.
RHO_RANGE = (1e-12, 1e3)
EPSILON_RANGE = (1e-6, 1e3)
DELTA_RANGE = (1e-30, 0.1)
# Weights are relative, and may be given as rhos (as small as RHO_RANGE allows); within this
# range every sum and ratio of 50 weights is a normal float.
WEIGHT_RANGE = (1e-12, 1e12)
# Clamp bounds: finite and at most this in size, so sums and sensitivities stay exact floats.
MAX_ABS_BOUND = 1e15


def _quoter(limit: int) -> reprlib.Repr:
    r = reprlib.Repr()
    # Few items per level and few levels: a structure of shared references (a YAML alias
    # bomb) is never expanded, whatever its nominal size.
    r.maxlevel = 3
    r.maxdict = r.maxlist = r.maxtuple = r.maxset = r.maxfrozenset = r.maxdeque = 8
    r.maxarray = 8
    r.maxstring = r.maxother = r.maxlong = limit
    return r


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr(value) in at most `limit` characters (cut with '...'), built in bounded work."""
    if isinstance(value, str | bytes | bytearray):
        text = repr(value[: limit + 1])  # never the whole of a long string
    else:
        try:
            text = _quoter(limit).repr(value)
        except Exception:  # a huge int (str conversion limit) or a hostile __repr__
            text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    return text


def check_identifier(value: object, what: str) -> str:
    """Return value if it is a lower-case SQL identifier, else raise a QueryError naming it."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise QueryError(
            f"{what} {quote(value)} is not a valid name: use lower-case letters, digits and "
            "'_', starting with a letter"
        )
    return value


class Statistic(enum.StrEnum):
    """The aggregate a measure computes."""

    COUNT = "count"  # number of distinct persons
    COUNT_ROWS = "count_rows"  # number of rows (visits, admissions...), capped per person
    SUM = "sum"
    MEAN = "mean"
    VARIANCE = "variance"
    STDDEV = "stddev"
    QUANTILE = "quantile"  # MEDIAN is QUANTILE with q = 0.5
    HISTOGRAM = "histogram"
    RATIO = "ratio"  # SUM(column) / SUM(denominator), or a row count where a side is None


NEEDS_COLUMN = frozenset(
    {
        Statistic.SUM,
        Statistic.MEAN,
        Statistic.VARIANCE,
        Statistic.STDDEV,
        Statistic.QUANTILE,
        Statistic.HISTOGRAM,
    }
)
# Finest public grid a histogram or quantile may ask for (each bin costs noise and bytes).
MAX_BINS = 1000


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise QueryError(f"{what} must be a finite number, got {quote(value)}")
    try:
        number = float(value)  # a huge JSON integer overflows here
    except OverflowError:
        raise QueryError(f"{what} is too large") from None
    if not math.isfinite(number):
        raise QueryError(f"{what} must be a finite number, got {quote(value)}")
    return number


def _in_range(value: object, what: str, bounds: tuple[float, float]) -> float:
    """A finite number within the public range [low, high], else a QueryError naming both."""
    number = _finite(value, what)
    low, high = bounds
    if not low <= number <= high:
        raise QueryError(f"{what} must be between {low:g} and {high:g}, got {number:.6g}")
    return number


@dataclass(frozen=True)
class Measure:
    """One aggregate in the output, e.g. the number of distinct persons or a median."""

    statistic: Statistic = Statistic.COUNT
    name: str = "count"
    column: str | None = None
    # RATIO: the denominator's column (None: count the rows).
    denominator: str | None = None
    # QUANTILE: which quantile, strictly between 0 and 1.
    quantile: float | None = None
    # HISTOGRAM and QUANTILE: number of equal-width bins over the clamp range.
    bins: int | None = None
    # CLAMP(x, lo, hi): narrower public bounds than the catalog's, for less noise.
    clamp: tuple[float, float] | None = None
    # Share of the query's rho relative to the other measures.
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.statistic, Statistic):
            raise QueryError(
                f"unknown statistic {quote(self.statistic)}; supported: "
                + ", ".join(s.value for s in Statistic)
            )
        stat = self.statistic
        # Before the name: SQL derives a quantile's name from its level (QUANTILE(x, -0.1) is
        # "q-10_x"), and the level is what the analyst must fix.
        if stat is Statistic.QUANTILE:
            q = _finite(self.quantile, f"measure {quote(self.name)} quantile")
            if not 0 < q < 1:
                raise QueryError(
                    f"measure {quote(self.name)}: the quantile must be between 0 and 1 "
                    f"(exclusive), got {q:.6g}"
                )
        check_identifier(self.name, "measure name")
        if stat in NEEDS_COLUMN and self.column is None:
            raise QueryError(f"measure {self.name!r}: {stat.value} needs a column")
        if stat in {Statistic.COUNT, Statistic.COUNT_ROWS} and self.column is not None:
            raise QueryError(f"measure {self.name!r}: {stat.value} takes no column")
        if self.column is not None:
            check_identifier(self.column, f"measure {self.name!r} column")
        if self.denominator is not None:
            if stat is not Statistic.RATIO:
                raise QueryError(f"measure {self.name!r}: only a ratio has a denominator")
            check_identifier(self.denominator, f"measure {self.name!r} denominator")
        if stat is not Statistic.QUANTILE and self.quantile is not None:
            raise QueryError(f"measure {self.name!r}: only a quantile takes a quantile level")
        if self.bins is not None:
            if stat not in {Statistic.HISTOGRAM, Statistic.QUANTILE}:
                raise QueryError(f"measure {self.name!r}: only histograms and quantiles take bins")
            if isinstance(self.bins, bool) or not isinstance(self.bins, int):
                raise QueryError(f"measure {self.name!r}: bins must be a whole number")
            if not 2 <= self.bins <= MAX_BINS:
                raise QueryError(f"measure {self.name!r}: bins must be between 2 and {MAX_BINS}")
        if self.clamp is not None:
            if stat in {Statistic.COUNT, Statistic.COUNT_ROWS}:
                raise QueryError(f"measure {self.name!r}: a count has nothing to clamp")
            if not isinstance(self.clamp, tuple) or len(self.clamp) != 2:
                raise QueryError(f"measure {self.name!r}: clamp must be (lower, upper)")
            bound = (-MAX_ABS_BOUND, MAX_ABS_BOUND)
            lo = _in_range(self.clamp[0], f"measure {self.name!r} clamp lower bound", bound)
            hi = _in_range(self.clamp[1], f"measure {self.name!r} clamp upper bound", bound)
            if not lo < hi:
                raise QueryError(f"measure {self.name!r}: clamp needs lower < upper")
            object.__setattr__(self, "clamp", (lo, hi))
        weight = _in_range(self.weight, f"measure {self.name!r} weight", WEIGHT_RANGE)
        object.__setattr__(self, "weight", weight)
        if self.quantile is not None:
            object.__setattr__(self, "quantile", float(self.quantile))

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults, for a compact canonical form."""
        out: dict[str, Any] = {"statistic": self.statistic.value, "name": self.name}
        for key in ("column", "denominator", "quantile", "bins"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.clamp is not None:
            out["clamp"] = [self.clamp[0], self.clamp[1]]
        if self.weight != 1.0:
            out["weight"] = self.weight
        return out


@dataclass(frozen=True)
class Filter:
    """Keep rows whose public column takes one of the listed values."""

    column: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        check_identifier(self.column, "filter column")
        if not isinstance(self.values, tuple):
            raise QueryError(f"filter values on {self.column!r} must be a tuple of strings")
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
        rho = _in_range(self.rho, "rho", RHO_RANGE)
        # Store a float so that equal queries have equal canonical bytes (1 vs 1.0).
        object.__setattr__(self, "rho", rho)
        if not self.measures:
            raise QueryError("the query has no measures; ask for at least one, e.g. count")
        if len(self.measures) > MAX_MEASURES:
            raise QueryError(
                f"the query has {len(self.measures)} measures, more than the limit of "
                f"{MAX_MEASURES}; split it into several queries"
            )
        names = [m.name for m in self.measures]
        if len(set(names)) != len(names):
            raise QueryError(f"measure names must be unique, got {quote(names)}")
        if len(self.group_by) > MAX_GROUP_BY:
            raise QueryError(f"the query groups by more than {MAX_GROUP_BY} columns")
        for col in self.group_by:
            check_identifier(col, "group-by column")
        if len(set(self.group_by)) != len(self.group_by):
            raise QueryError(f"group-by columns repeat: {quote(list(self.group_by))}")
        if len(self.where) > MAX_FILTERS:
            raise QueryError(f"the query has more than {MAX_FILTERS} filters")
        filtered = [f.column for f in self.where]
        if len(set(filtered)) != len(filtered):
            raise QueryError(
                f"filter columns repeat: {quote(filtered)}; put all values in one filter"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; from_dict(to_dict(q)) == q."""
        return {
            "version": SPEC_VERSION,
            "view": self.view,
            "rho": self.rho,
            "measures": [m.to_dict() for m in self.measures],
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


def rho_from_epsilon(epsilon: float, delta: float) -> float:
    """The largest rho whose zCDP guarantee implies (epsilon, delta)-DP (Bun & Steinke 2016).

    Solves epsilon = rho + 2 sqrt(rho ln(1/delta)) for rho: with s = sqrt(rho),
    s^2 + 2 s sqrt(L) - epsilon = 0, so s = sqrt(L + epsilon) - sqrt(L).
    """
    epsilon = _in_range(epsilon, "epsilon", EPSILON_RANGE)
    delta = _in_range(delta, "delta", DELTA_RANGE)
    log_term = -math.log(delta)
    rho = (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2
    # rho <= epsilon, so only the lower end of rho's range can be missed.
    if rho < RHO_RANGE[0]:
        raise QueryError(
            f"epsilon {epsilon:.6g} at delta {delta:.6g} is rho {rho:.6g}, below the smallest "
            f"rho a query may ask for ({RHO_RANGE[0]:g}); ask for a larger epsilon"
        )
    return rho


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
