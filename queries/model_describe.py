"""A model plan in words, for Explain: the design, the rows, every step's vectors and cost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from queries.model import Family

if TYPE_CHECKING:
    from queries.model_plan import ModelPlan, StepPlan, Term

_WHAT = {
    "counts": "n and the count at each level column",
    "outcome_sum": "the outcome's sum",
    "gradient": "gradient sum x (y - mu)",
    "hessian": "Hessian sum w x x' (upper triangle)",
    "xtx": "X'X (upper triangle)",
    "xty": "X'y",
    "yty": "y'y",
    "n": "n",
    "unit_outcome": "the outcome's sum at each level of the compared column",
    "unit_residual": "sum of y - mu at each level of the compared column",
    "loss": "the training log-loss, each row's capped at 10",
    "score_hist": "held-out rows by outcome (events, then the others) and bin of eta",
}


def _term(t: Term) -> str:
    if t.kind == "intercept":
        return f"{t.name}: 1"
    if t.kind == "level":
        return f"{t.name}: 1 if {t.column} = {t.level!r}, else 0"
    if t.kind == "numeric":
        span = f"[{t.lower:g}, {t.upper:g}]"
        return f"{t.name}: ({t.column} clamped to {span} - {t.lower:g}) / {t.upper - t.lower:g}"
    here = "this node" if t.constant else "another node"
    return f"{t.name}: {t.constant:g} ({here})"


def _link(plan: ModelPlan) -> str:
    if plan.family is Family.BINOMIAL:
        return "mu = 1 / (1 + exp(-eta)), eta clamped to [-30, 30]; w = mu (1 - mu) <= 1/4"
    if plan.family is Family.POISSON:
        return (
            f"mu = exp(eta), capped at {plan.mu_max:g} (the outcome's upper bound); "
            f"w = mu <= {plan.mu_max:g}, |y - mu| <= {plan.mu_max:g}"
        )
    return "identity link: X'X, X'y and y'y in one step"


def _step(s: StepPlan, total: float, last: int, expected: int | None) -> list[str]:
    if s.step == 0:
        name = "step 0, the design check"
    elif s.step == expected and s.vectors[0].name == "score_hist":
        name = f"step {s.step}, the evaluation, on the held-out persons"
    elif s.step == expected:
        name = f"step {s.step}, the expected step, at the final coefficients"
    elif s.step == last:
        name = f"step {s.step}"
    else:
        name = f"steps {s.step}-{last}, each"
    lines = [f"  {name}: rho {s.rho:.4g} ({100 * s.rho / total:.1f}% of the model's)"]
    for v in s.vectors:
        unit = f", fixed-point unit {v.unit:g}" if v.exponent else ""
        lines.append(
            f"    {v.name} ({_WHAT[v.name]}): {v.length} value(s), each row adds at most "
            f"{v.entry_bound:g} per entry{unit}; L2 sensitivity {v.sensitivity:g} units; "
            f"rho {v.rho:.4g}"
        )
    return lines


def describe_plan(plan: ModelPlan) -> str:
    """The fit in words (no data involved)."""
    m = plan.model
    out = plan.outcome
    y = (
        f"1 if {out.column} = {out.event!r}, else 0"
        if out.event is not None
        else f"{out.column} clamped to [{out.lower:g}, {out.upper:g}]"
    )
    rows = f"at most {plan.rows_per_person} row(s) per person"
    where = "; ".join(f"{c} in {list(v)}" for c, v in plan.filters) or "every row"
    lines = [
        f"model: {m.family.value} ({m.link} link) on view {plan.view.name} ({rows}); rows: "
        f"{where}, with every model column present",
        f"outcome y: {y}",
    ]
    if plan.offset is not None:
        name, lo, hi = plan.offset
        lines.append(f"offset: log({name} clamped to [{lo:g}, {hi:g}])")
    lines.append(f"design: {len(plan.columns)} column(s), at most {plan.nonzero} not 0 in a row")
    lines += [f"  {_term(t)}" for t in plan.terms]
    lines.append(f"link: {_link(plan)}")
    expected = m.expected_step or m.evaluation_step
    kind = "gradient-descent round(s)" if m.solver == "gradient" else "Newton step(s)"
    last_step = ", then the evaluation" if m.evaluation_step else ", then the expected step"
    then = f"{m.newton_steps} {kind}" + (last_step if expected else "")
    lines.append(
        f"steps: {m.steps} (the design check, then {then}), each charged before it is "
        "released; discrete Gaussian noise on every vector"
    )
    if plan.split_column is not None:
        lines.append(
            f"rows: persons with md5({plan.split_column}) % 5 = 0 (a fifth) are held out for "
            "the evaluation; the others are trained on"
        )
    if m.expected_step is not None:
        lines.append(
            f"units compared: the {len(plan.units)} level(s) of {m.compare_by} "
            f"({', '.join(plan.units)}); not in the design"
        )
    last = m.newton_steps
    # The Newton steps release the same vectors at the same cost: the first stands for all.
    for s in (*plan.steps[:2], *plan.steps[last + 1 :]):
        lines += _step(s, m.rho, last, expected)
    return "\n".join(lines)
