"""What the Models page needs: a model or comparison from its form, run, and read back.

A fit (Federation.fit) and a comparison (coordinator/learning/compare.compare, the function
`chc learn compare` calls) are kept as their JSON (`to_dict()`, the `--json` of those
commands), and the page is drawn from that JSON alone, fresh or re-opened from History, so
the two look the same. Every form value is checked by the spec's own constructors
(ModelSpec, Filter, adjusting_model): their messages name the field and what to give.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.analyst import report
from coordinator.analyst.client import Federation
from coordinator.learning.compare import BY_REGION, Comparison, adjusting_model, compare
from coordinator.learning.result import FitResult
from queries.errors import QueryError
from queries.model import INTERCEPT, Covariate, Family, ModelSpec
from queries.present import cells
from queries.schema import ColumnType, ViewSpec
from queries.spec import Filter

# A first fit costs little; a comparison's default is the CLI's (compare.DEFAULT_RHO).
DEFAULT_MODEL_RHO = 0.5
COMPARE_FAMILIES = (Family.BINOMIAL, Family.POISSON)
# A form field is a short text: a longer one is a mistake (or an attack), not a model.
MAX_FIELD = 400

Form = Mapping[str, Sequence[str]]


def first(form: Form, name: str, default: str = "") -> str:
    """A form field's first value (stripped), or default."""
    values = form.get(name) or [default]
    return values[0].strip()[:MAX_FIELD]


def every(form: Form, name: str) -> list[str]:
    """Every value of a repeated field (the checked checkboxes), in order, without repeats."""
    return list(dict.fromkeys(v.strip()[:MAX_FIELD] for v in form.get(name, []) if v.strip()))


@dataclass(frozen=True)
class FormValues:
    """What a form was sent with, to show it filled in again (empty: its defaults)."""

    form: Form

    def get(self, name: str, default: str = "") -> str:
        """A field's value, or default when the form did not send it."""
        return first(self.form, name, default) if name in self.form else default

    def checked(self, name: str, value: str) -> bool:
        """Whether a checkbox (name, value) was checked."""
        return value in self.form.get(name, ())


def model_columns(view: ViewSpec) -> list[str]:
    """Columns a model may use: every public one (identifiers are never published)."""
    return [c.name for c in view.columns if c.type is not ColumnType.IDENTIFIER]


def category_columns(view: ViewSpec) -> list[str]:
    """Public category columns: the candidates for compared units and binary outcomes."""
    return [c.name for c in view.columns if c.type is ColumnType.CATEGORY and c.domain]


def default_outcome(view: ViewSpec) -> str:
    """A yes/no column if the view has one (admitted, deceased...), else its first column."""
    for c in view.columns:
        if c.type is ColumnType.CATEGORY and "yes" in c.domain and len(c.domain) == 2:
            return c.name
    columns = model_columns(view)
    return columns[0] if columns else ""


def column_label(view: ViewSpec, name: str) -> str:
    """A column as the form offers it: its name and its public levels or bounds."""
    column = next((c for c in view.columns if c.name == name), None)
    if column is None:
        return name
    if column.domain:
        levels = ", ".join(column.domain[:8]) + (", ..." if len(column.domain) > 8 else "")
        return f"{name} ({levels})"
    if column.lower is not None and column.upper is not None:
        return f"{name} ({cells.number(column.lower)} to {cells.number(column.upper)})"
    return name


def _family(text: str, allowed: Sequence[Family] = tuple(Family)) -> Family:
    try:
        family = Family(text)
    except ValueError:
        family = None
    if family is None or family not in allowed:
        raise QueryError(
            f"family {text[:40]!r} is not one of {', '.join(f.value for f in allowed)}: "
            "pick one from the list"
        )
    return family


def _rho(text: str, field: str) -> float:
    try:
        rho = float(text)
    except ValueError:
        raise QueryError(
            f"{field} {text[:40]!r} is not a number: give the zCDP budget the whole fit "
            "charges at each node, e.g. 0.5"
        ) from None
    if not math.isfinite(rho) or rho <= 0:
        raise QueryError(f"{field} must be a positive number (the budget per node), got {text}")
    return rho


def _where(text: str) -> tuple[Filter, ...]:
    """`COLUMN=V1,V2; COLUMN=V3`: the rows fitted on (`chc learn glm --where`, `;` between).

    Not coordinator/learning/cli.parse_where: importing that module registers every
    `chc learn` command, Flower's included, in the dashboard's process.
    """
    filters = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        column, sep, values = part.partition("=")
        levels = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not column.strip() or not levels:
            raise QueryError(
                f"rows {part[:60]!r}: write COLUMN=LEVEL1,LEVEL2 (several separated by ;), "
                "e.g. sex=female,male"
            )
        filters.append(Filter(column=column.strip(), values=levels))
    return tuple(filters)


def model_from_form(form: Form) -> ModelSpec:
    """The ModelSpec a Models form describes (the spec checks every field)."""
    family = _family(first(form, "family", Family.BINOMIAL.value))
    event = first(form, "event") or None
    return ModelSpec(
        view=first(form, "view"),
        outcome=first(form, "outcome"),
        family=family,
        covariates=tuple(Covariate(column=c) for c in every(form, "covariate")),
        rho=_rho(first(form, "rho"), "rho"),
        region=first(form, "region") == "1",
        event=event if family is Family.BINOMIAL else None,
        where=_where(first(form, "where")),
    )


@dataclass(frozen=True)
class CompareRequest:
    """A comparison form: the adjusting model, the units, and the overdispersion choice."""

    model: ModelSpec
    by: str
    overdispersion: bool


def comparison_from_form(form: Form) -> CompareRequest:
    """The adjusting model and units a comparison form describes (adjusting_model checks)."""
    by = first(form, "by", BY_REGION) or BY_REGION
    family = _family(first(form, "family", Family.BINOMIAL.value), COMPARE_FAMILIES)
    model = adjusting_model(
        first(form, "view"),
        first(form, "outcome"),
        every(form, "adjust"),
        _rho(first(form, "rho"), "rho"),
        by=by,
        family=family,
        event=(first(form, "event") or None) if family is Family.BINOMIAL else None,
        where=_where(first(form, "where")),
    )
    return CompareRequest(model=model, by=by, overdispersion=first(form, "overdispersion") == "1")


def describe(model: ModelSpec) -> str:
    """A model in one line, for History: `binomial: admitted ~ sex + region on copd`."""
    terms = [c.column for c in model.covariates] + (["region"] if model.region else [])
    where = "; ".join(f"{f.column}={','.join(f.values)}" for f in model.where)
    text = f"{model.family.value}: {model.outcome} ~ {' + '.join(terms) or '1'} on {model.view}"
    return text + (f" where {where}" if where else "")


def spec_json(model: ModelSpec) -> str:
    """The model spec as History keeps it (sorted keys, the form every ledger hashes)."""
    return json.dumps(model.to_dict(), sort_keys=True, separators=(",", ":"))


def json_ready(value: Any) -> Any:
    """value with every non-finite float made null (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def fit(fed: Federation, model: ModelSpec) -> dict[str, Any]:
    """Fit across the federation; the record the page draws (a QueryError if no node fit)."""
    result = fed.fit(model)
    if not result.coefficients:
        raise QueryError(report.nobody_answered(result.nodes).reason)
    return fit_record(result)


def fit_record(result: FitResult) -> dict[str, Any]:
    """A fit as History keeps it: `chc learn glm --json`, and what exp(coefficient) is."""
    record: dict[str, Any] = json_ready({"fit": result.to_dict(), "ratio_name": result.ratio_name})
    return record


def run_comparison(fed: Federation, request: CompareRequest) -> dict[str, Any]:
    """Fit the adjusting model and compare the units; the record the page draws."""
    found = compare(fed, request.model, by=request.by, overdispersion=request.overdispersion)
    return comparison_record(found)


def comparison_record(found: Comparison) -> dict[str, Any]:
    """A comparison as History keeps it: `chc learn compare --json`, and its adjustment."""
    record: dict[str, Any] = json_ready(
        {
            "comparison": found.to_dict(),
            "adjustment": found.fit_adjustment(),
            "ratio_name": found.fit.ratio_name,
        }
    )
    return record


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) else "no estimate"


def _interval(lo: Any, hi: Any, spec: str = ".4g") -> str:
    if not isinstance(lo, int | float) or not isinstance(hi, int | float):
        return "no interval"
    return f"{lo:{spec}} to {hi:{spec}}"


def coefficient_rows(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The coefficient table as the page shows it: one row per term of the design."""
    rows = []
    for c in record["fit"]["coefficients"]:
        rows.append(
            {
                "term": str(c["column"]),
                "intercept": c["column"] == INTERCEPT,
                "estimate": _fmt(c["estimate"], ".4g"),
                "dp_se": _fmt(c["dp_std_error"], ".3g"),
                "se": _fmt(c["std_error"], ".3g"),
                "ci": _interval(c["ci_low"], c["ci_high"]),
                "ratio": _fmt(c.get("ratio"), ".4g"),
                "ratio_ci": _interval(c.get("ratio_low"), c.get("ratio_high")),
            }
        )
    return rows


OUTLIER, ALERT, NONE = "outlier", "alert", "none"


def unit_flag(flag: str, ratio: Any) -> str:
    """outlier (outside the 99.8% limits), alert (outside 95% only) or none (compare.py's
    Comparison.outliers and .alerts read the same flag texts)."""
    if not isinstance(ratio, int | float):
        return NONE
    if flag.endswith("99.8%"):
        return OUTLIER
    if flag.endswith(" 95%"):
        return ALERT
    return NONE


def unit_rows(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The O/E table as the page shows it: one row per compared unit."""
    rows = []
    for u in record["comparison"]["units"]:
        scored = isinstance(u["ratio"], int | float)
        flag = str(u.get("flag") or "")
        rows.append(
            {
                "unit": str(u["unit"]),
                "flag": unit_flag(flag, u["ratio"]),
                "observed": _fmt(u["observed"], ".1f") if scored else "",
                "expected": _fmt(u["expected"], ".1f") if scored else "",
                "ratio": _fmt(u["ratio"], ".3f") if scored else "",
                "ci": _interval(u["ci_low"], u["ci_high"], ".3f") if scored else "",
                "funnel": flag or "within the limits",
            }
        )
    return rows
