"""A model checked against a node's catalog: filters, outcome, offset, regions, coefficients.

Every refusal here is a QueryError naming the model's field (`where`, `outcome`, `event`,
`outcome_clamp`, `offset`, `regions`, `coefficients`) and saying what to do; nothing here
reads data, so a refused model costs nothing. queries/model_plan.py builds the plan on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from queries import mlp
from queries.errors import QueryError
from queries.model import Family, ModelSpec
from queries.schema import ColumnType, ViewSpec
from queries.spec import quote

if TYPE_CHECKING:
    from queries.model_plan import ModelPlan

# Coefficients the hub may send: finite and at most this in absolute value (on [0, 1]
# covariates a coefficient of 1e6 is already absurd), so eta never overflows a double.
MAX_COEFFICIENT = 1e6
MAX_REGIONS = 64


@dataclass(frozen=True)
class Outcome:
    """The outcome: a category's event level (binomial), or a clamped number."""

    column: str
    event: str | None
    lower: float
    upper: float

    @property
    def largest(self) -> float:
        """The largest |y| a row can have."""
        return max(abs(self.lower), abs(self.upper))


def check_filters(model: ModelSpec, view: ViewSpec) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for f in model.where:
        col = view.column(f.column)
        if col.type is not ColumnType.CATEGORY:
            names = [c.name for c in view.columns if c.type is ColumnType.CATEGORY]
            raise QueryError(
                f"where: cannot filter on {f.column!r}: only public category columns may be "
                f"filtered ({', '.join(names)})"
            )
        bad = [v for v in f.values if v not in col.domain]
        if bad:
            raise QueryError(
                f"where: filter on {f.column!r} uses {quote(bad)}, not in its public domain "
                f"{quote(list(col.domain))}"
            )
        out[f.column] = tuple(v for v in col.domain if v in f.values)
    return out


def bounds(
    view: ViewSpec, name: str, clamp: tuple[float, float] | None, what: str
) -> tuple[float, float]:
    """A numeric column's bounds: its public ones, narrowed by the analyst's clamp."""
    col = view.column(name)
    if col.type not in (ColumnType.INTEGER, ColumnType.FLOAT):
        raise QueryError(
            f"{what} {name!r} is a {col.type.value} column, not a number; numeric columns of "
            f"{view.name!r}: {[c.name for c in view.columns if c.bounded]}"
        )
    if clamp is None:
        if col.lower is None or col.upper is None:
            raise QueryError(f"{what} {name!r} has no public bounds; give clamp bounds")
        return float(col.lower), float(col.upper)
    lo, hi = float(clamp[0]), float(clamp[1])
    if col.lower is not None and col.upper is not None:
        lo, hi = max(lo, col.lower), min(hi, col.upper)
    if not lo < hi:
        raise QueryError(
            f"{what} {name!r}: clamp {list(clamp)} does not overlap its public bounds "
            f"[{col.lower:g}, {col.upper:g}]"
        )
    return lo, hi


def check_outcome(model: ModelSpec, view: ViewSpec, filters: dict[str, tuple[str, ...]]) -> Outcome:
    col = view.column(model.outcome)
    if model.family is Family.BINOMIAL:
        if col.type is not ColumnType.CATEGORY:
            raise QueryError(
                f"outcome {model.outcome!r} is a {col.type.value} column; a binomial outcome "
                "is a yes/no category: use family poisson (a count) or gaussian (a number)"
            )
        event = model.event if model.event is not None else "yes"
        levels = filters.get(model.outcome, col.domain)
        if event not in levels:
            raise QueryError(
                f"event: {event!r} is not a level of outcome {model.outcome!r} "
                f"{quote(list(levels))}; name the level that counts as 1"
            )
        return Outcome(column=model.outcome, event=event, lower=0.0, upper=1.0)
    what = "a count (poisson)" if model.family is Family.POISSON else "a number (gaussian)"
    if col.type is ColumnType.CATEGORY:
        raise QueryError(
            f"outcome {model.outcome!r} is a category; {what} needs a numeric column, or "
            "use family binomial with event"
        )
    lo, hi = bounds(view, model.outcome, model.outcome_clamp, "outcome")
    if model.family is Family.POISSON and (lo < 0 or hi <= 0):
        raise QueryError(
            f"outcome_clamp: a Poisson outcome is a count, so its bounds must be >= 0 with a "
            f"positive upper bound, got [{lo:g}, {hi:g}]"
        )
    return Outcome(column=model.outcome, event=None, lower=lo, upper=hi)


def check_compare_by(
    model: ModelSpec, view: ViewSpec, filters: dict[str, tuple[str, ...]]
) -> tuple[str, ...]:
    """The levels of the compared column (its public domain, narrowed by the filters)."""
    name = model.compare_by
    if name is None:
        return ()
    names = [c.name for c in view.columns]
    if name not in names:
        hint = (
            ": this node's custodian has not declared care sites ([care_sites] publish in "
            "node.toml), so it publishes no care_site"
            if name == "care_site"
            else ""
        )
        raise QueryError(f"compare_by: view {view.name!r} has no column {name!r}{hint}")
    col = view.column(name)
    if col.type is not ColumnType.CATEGORY or not col.person_level:
        raise QueryError(
            f"compare_by: {name!r} is not a public category of the person; units compared "
            "must be one (such as care_site, the person's usual care site)"
        )
    return filters.get(name, col.domain)


def check_offset(model: ModelSpec, view: ViewSpec) -> tuple[str, float, float] | None:
    if model.offset is None:
        return None
    if model.family is not Family.POISSON:
        raise QueryError(
            f"offset: a log offset is for Poisson rate models, not {model.family.value}"
        )
    lo, hi = bounds(view, model.offset, None, "offset")
    if not lo > 0:
        raise QueryError(
            f"offset {model.offset!r} has public lower bound {lo:g}; its log needs a positive "
            "lower bound (e.g. person-time of at least 1 day)"
        )
    return model.offset, lo, hi


def check_regions(model: ModelSpec, node: str, regions: Sequence[str]) -> tuple[str, ...]:
    out = tuple(regions)
    if len(out) > MAX_REGIONS or not all(isinstance(r, str) and 0 < len(r) <= 63 for r in out):
        raise QueryError(f"regions must be at most {MAX_REGIONS} node names")
    if len(set(out)) != len(out):
        raise QueryError(f"regions repeat a node: {quote(list(out))}")
    if model.region and node not in out:
        raise QueryError(
            f"regions {quote(list(out))} do not include this node {node!r}; a region effect "
            "needs every node of the fit, this one included"
        )
    return out


def check_coefficients(
    plan: ModelPlan, step: int, coefficients: Sequence[float]
) -> tuple[float, ...]:
    """The hub's coefficients for a step, checked: one per design column, finite, bounded.

    A gradient fit's evaluation step also takes the range of eta its score histograms bin
    (low, high): the hub's choice, from its own releases, so public like the coefficients.
    """
    if step == 0 or plan.family is Family.GAUSSIAN:
        if coefficients:
            raise QueryError(
                f"coefficients: step {step} of a {plan.family.value} fit takes none, got "
                f"{len(coefficients)}"
            )
        return ()
    evaluation = step == plan.model.evaluation_step
    wanted = plan.parameters + (2 if evaluation else 0)
    if len(coefficients) != wanted:
        then = ", then the score range's low and high" if evaluation else ""
        what = (
            f"{plan.parameters} network parameters (queries/mlp.py)"
            if plan.model.hidden
            else f"one per design column ({len(plan.columns)}: {', '.join(plan.columns)})"
        )
        raise QueryError(f"coefficients: step {step} needs {what}{then}, got {len(coefficients)}")
    if evaluation and not coefficients[-2] < coefficients[-1]:
        raise QueryError(
            f"coefficients: the evaluation's score range [{coefficients[-2]!r}, "
            f"{coefficients[-1]!r}] must have low < high"
        )
    params = mlp.names(plan.columns, plan.model.hidden) if plan.model.hidden else plan.columns
    names = [*params, "score range low", "score range high"][: len(coefficients)]
    for name, b in zip(names, coefficients, strict=True):
        if not (math.isfinite(b) and abs(b) <= MAX_COEFFICIENT):
            raise QueryError(
                f"coefficients: {name} is {b!r}; each must be finite and at most "
                f"{MAX_COEFFICIENT:g} in absolute value"
            )
    return tuple(float(b) for b in coefficients)
