"""The immutable query model: what an analyst asks, independent of transport and SQL.

A query is a tree of frozen dataclasses validated on construction (Tumult style). Checks
that need the node's catalog (does the view exist, is the column public) live in plan.py.
The canonical encoding is what analysts sign, so it must be deterministic. Reading a spec
from a mapping, JSON or YAML, with its bounds on size and nesting, is in spec_io.py.
"""

from __future__ import annotations

import enum
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from queries.errors import QueryError
from queries.numbers import show_apart

if TYPE_CHECKING:
    # queries.cohort builds on this module (names, quoting), so it is imported lazily.
    from queries.cohort import Cohort

SPEC_VERSION = "chc.query/1"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# A spec with more than this many filter values is almost certainly a mistake or an attack.
MAX_FILTER_VALUES = 1000
# Every measure costs noise, SQL and transfer; more than this in one query is refused.
MAX_MEASURES = 50
# Group-by columns and filters name distinct public columns, of which a view has a handful.
MAX_GROUP_BY = 20
MAX_FILTERS = 50
# An analyst's per-person contribution cap (rows_per_person) is at least 1; a node refuses one
# above its view's own cap. Views cap persons at far fewer rows than this.
MAX_ROWS_PER_PERSON = 10_000
# The most nodes a secure-aggregation round may assume honest (honest_nodes).
MAX_HONEST_NODES = 1000

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
        got, lo, hi = show_apart(number, low, high)
        raise QueryError(f"{what} must be between {lo} and {hi}, got {got}")
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
    # The analyst's cap on rows counted per person (bias against noise): None means the
    # view's own max_rows_per_person; a lower cap scales every sensitivity down with it.
    rows_per_person: int | None = None
    # An ad hoc cohort (queries/cohort.py): the view is then the reserved "cohort".
    cohort: Cohort | None = None
    # Secure aggregation (docs/secure-aggregation.md): the analyst gives up per-region
    # answers, and the hub learns only the pooled noisy sum, with central DP's accuracy.
    pooled_only: bool = False
    # How many of the envelope's k nodes the noise shares assume honest (t); None: all k.
    honest_nodes: int | None = None

    def __post_init__(self) -> None:
        check_identifier(self.view, "view")
        if not isinstance(self.pooled_only, bool):
            raise QueryError(f"pooled_only must be true or false, got {quote(self.pooled_only)}")
        t = self.honest_nodes
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_HONEST_NODES:
                raise QueryError(
                    f"honest_nodes must be a whole number from 1 to {MAX_HONEST_NODES} (or "
                    f"absent, for every node of the query), got {quote(t)}"
                )
            if not self.pooled_only:
                raise QueryError(
                    "honest_nodes only goes with pooled_only: true (it sizes the noise shares "
                    "of secure aggregation)"
                )
        from queries.cohort import check_view  # lazy: queries.cohort imports this module

        check_view(self.view, self.cohort)
        cap = self.rows_per_person
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_ROWS_PER_PERSON
        ):
            raise QueryError(
                f"rows_per_person must be a whole number from 1 to {MAX_ROWS_PER_PERSON} "
                f"(or absent, for the view's own cap), got {quote(cap)}"
            )
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
            # Only when chosen, so that every query without one keeps its canonical bytes.
            **({"rows_per_person": self.rows_per_person} if self.rows_per_person else {}),
            **({"cohort": self.cohort.to_dict()} if self.cohort is not None else {}),
            **({"pooled_only": True} if self.pooled_only else {}),
            **({"honest_nodes": self.honest_nodes} if self.honest_nodes is not None else {}),
        }


def canonical_bytes(query: Query) -> bytes:
    """The deterministic encoding of a query that analysts sign and ledgers hash."""
    return json.dumps(query.to_dict(), sort_keys=True, separators=(",", ":")).encode()


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
