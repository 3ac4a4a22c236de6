"""A fit step's numbers: its calibrations, exact sums, released vectors and the design check.

Kept apart from node/fitting.py, which decides when each runs: these only turn a plan
(queries/model_plan.py) and the data into numbers. The exact sums never leave this module
and node/fitting.py except as noisy vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from node.config import ModelPolicy
from node.engine import SqlRunner
from protocols.v1 import node_pb2
from queries import mechanisms, mlp, model_sql
from queries.model import Family
from queries.model_plan import LOSS_CAP, SCORE_BINS, ModelPlan, StepPlan
from queries.results import MeasureNoise, NoiseInfo
from queries.schema import ColumnType


def calibrate_step(step: StepPlan) -> tuple[mechanisms.Calibration, ...]:
    """The discrete Gaussian of each of the step's vectors, fixed before any data is read."""
    return tuple(mechanisms.calibrate(v.sensitivity, v.rho) for v in step.vectors)


def step_noise(step: StepPlan) -> list[MeasureNoise]:
    """Each vector's noise in its natural units and its rho, for Explain."""
    out = []
    for v, c in zip(step.vectors, calibrate_step(step), strict=True):
        noise = NoiseInfo(
            mechanism=mechanisms.MECHANISM,
            scale=c.scale * v.unit,
            variance=c.variance * v.unit**2,
            sensitivity=c.sensitivity * v.unit,
        )
        out.append(
            MeasureNoise(
                measure=f"step {step.step}: {v.name}", statistic=v.name, noise=noise, rho=c.rho
            )
        )
    return out


def _network_step(
    runner: SqlRunner, plan: ModelPlan, k: int, parameters: Sequence[float]
) -> dict[str, list[int]]:
    """A network's round or evaluation, from its part's rows (queries/mlp.py)."""
    table = runner.query(model_sql.network_rows_sql(plan, k))
    p = len(plan.terms)
    x = np.column_stack(
        [table.column(f"x{j}").to_numpy(zero_copy_only=False) for j in range(p)]
    ).astype(np.float64)
    y = table.column("y").to_numpy(zero_copy_only=False).astype(np.float64)
    theta = np.asarray(parameters[: plan.parameters], dtype=np.float64)
    step = plan.step(k)
    if k == plan.model.evaluation_step:
        low, high = parameters[plan.parameters], parameters[plan.parameters + 1]
        z = mlp.logits(theta, x, plan.model.hidden) if len(y) else np.zeros(0)
        width = (high - low) / SCORE_BINS
        bins = np.clip(np.floor((z - low) / width), 0, SCORE_BINS - 1).astype(np.int64)
        events = np.bincount(bins[y == 1], minlength=SCORE_BINS)
        others = np.bincount(bins[y == 0], minlength=SCORE_BINS)
        return {"score_hist": [int(v) for v in (*events, *others)]}
    persons = table.column("pid").to_numpy(zero_copy_only=False).astype(np.int64)
    gradient = mlp.clipped_sum_units(
        theta,
        x,
        y,
        persons,
        hidden=plan.model.hidden,
        clip=plan.model.clip,
        exponent=step.vector("gradient").exponent,
    )
    if len(y):
        _, mu = mlp.row_gradients(theta, x, y, plan.model.hidden)
        loss = np.minimum(-(y * np.log(mu) + (1 - y) * np.log1p(-mu)), LOSS_CAP)
    else:
        loss = np.zeros(0)
    units = int(mlp.to_units(loss, step.vector("loss").exponent).sum())
    return {"gradient": gradient, "loss": [units]}


def exact_step(
    runner: SqlRunner, plan: ModelPlan, k: int, coefficients: Sequence[float]
) -> dict[str, list[int]]:
    """The exact integer sums of step k, per vector (entries 0 on every row are 0)."""
    if plan.model.hidden and k > 0:
        return _network_step(runner, plan, k, coefficients)
    table = runner.query(model_sql.step_sql(plan, k, coefficients))
    row = {name: table.column(name)[0].as_py() for name in table.column_names}
    columns = model_sql.entry_columns(plan, plan.step(k))
    return {
        name: [0 if col is None else int(row[col] or 0) for col in cols]
        for name, cols in columns.items()
    }


def _vector(name: str, values: Sequence[float], variance: float) -> node_pb2.StatisticVector:
    return node_pb2.StatisticVector(name=name, values=list(values), noise_variance=variance)


def noisy_vectors(
    plan: ModelPlan,
    k: int,
    noisy: Mapping[str, Sequence[int]],
    calibrations: Sequence[mechanisms.Calibration],
) -> list[node_pb2.StatisticVector]:
    """The step's release in natural units (queries/model.py StepRelease names them).

    The design check's n and level counts share one discrete Gaussian ("counts"): the
    intercept's entry and this node's region indicator are n again, numeric columns and other
    nodes' regions 0, so level_counts has the counts' noise variance at most.
    """
    step = plan.step(k)
    out: list[node_pb2.StatisticVector] = []
    for v, c in zip(step.vectors, calibrations, strict=True):
        values = noisy[v.name]
        variance = c.variance * v.unit**2
        if v.name != "counts":
            out.append(_vector(v.name, [x * v.unit for x in values], variance))
            continue
        n, levels = values[0], iter(values[1:])
        per_column: list[float] = []
        for t in plan.terms:
            if t.kind == "level":
                per_column.append(float(next(levels)))
            elif t.kind in ("intercept", "region") and t.constant:
                per_column.append(float(n))
            else:
                per_column.append(0.0)
        out += [_vector("n", [float(n)], variance), _vector("level_counts", per_column, variance)]
    return out


def decide_design(plan: ModelPlan, noisy: Mapping[str, Sequence[int]], policy: ModelPolicy) -> str:
    """Why the node's [models] policy refuses the fit on its noisy design check, or ""."""
    counts = noisy["counts"]
    n = counts[0]
    p = len(plan.columns)
    least = policy.min_level_persons
    if p > policy.max_parameter_ratio * n:
        return (
            f"design: {p} parameters for about {max(n, 0)} persons here (a noisy count), more "
            f"than this node's max_parameter_ratio of {policy.max_parameter_ratio:g} per "
            "person allows ([models] in its node.toml)"
        )
    found: list[tuple[str, int]] = [("every row (n)", n)]
    by_term = dict(zip([t.name for t in plan.terms if t.kind == "level"], counts[1:], strict=True))
    filters = dict(plan.filters)
    for cv in plan.model.covariates:
        col = plan.view.column(cv.column)
        if col.type is not ColumnType.CATEGORY:
            continue
        kept = filters.get(cv.column, col.domain)
        reference = cv.reference if cv.reference is not None else kept[0]
        others = [by_term[f"{cv.column}[{lv}]"] for lv in kept if lv != reference]
        found.append((f"{cv.column}[{reference}] (the reference level)", n - sum(others)))
        found += [
            (f"{cv.column}[{lv}]", by_term[f"{cv.column}[{lv}]"]) for lv in kept if lv != reference
        ]
    if plan.family is Family.BINOMIAL:
        events = noisy["outcome_sum"][0]
        event = plan.outcome.event
        found += [
            (f"{plan.outcome.column} = {event!r} (events)", events),
            (f"{plan.outcome.column} other than {event!r} (non-events)", n - events),
        ]
    for what, count in found:
        if count < least:
            return (
                f"design: {what} has about {max(count, 0)} persons here (a noisy count), fewer "
                f"than this node's min_level_persons of {least} ([models] in its node.toml)"
            )
    return ""
