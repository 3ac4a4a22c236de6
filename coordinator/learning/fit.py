"""The hub's fit loop: design check, Newton steps, standard errors; transport-free.

`solve` asks for each step's releases through a callable (the hub's fan-out, or a test's
exact statistics), so the whole loop runs the same with or without gRPC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from coordinator.learning import glm
from queries.errors import QueryError
from queries.fitted import Z95, FitIterationInfo, FittedCoefficient
from queries.model import INTERCEPT, Family, ModelSpec, StepRelease

# Ask the fitting nodes for one Newton step at these coefficients (one per design column).
AskStep = Callable[[int, Sequence[float]], Sequence[StepRelease]]
# A fit has converged when its last step moved every coefficient by less than this many
# total standard errors, or by less than NOISE_SES of its DP-only standard error: under noise
# each step moves by about sqrt(2) DP SEs however many steps are taken, so 6 is 4.2 sds of
# that move: a settled fit of 12 coefficients reads "not converged" about 3 times in 10,000
# (at 4, 2.8 sds, it was about 1 fit in 20, measured 1 in 30 on the known model at rho 1000).
# Otherwise the message says it has not, and suggests more iterations.
CONVERGED_SES = 0.1
NOISE_SES = 6.0


@dataclass(frozen=True)
class Solution:
    """What the solver found: coefficients, convergence, the pooled n and notes for people."""

    coefficients: tuple[FittedCoefficient, ...]
    iterations: tuple[FitIterationInfo, ...]
    persons: int
    message: str
    # The final coefficients over every design column (held ones 0), for an expected step.
    beta: tuple[float, ...] = ()


def held_columns(
    columns: tuple[str, ...], regions: Sequence[str], fitting: Sequence[str], region: bool
) -> tuple[str, ...]:
    """The design columns held at 0 because their region was left out of the fit.

    Every step is planned with the same regions (each node checks it), so a node left out
    after the design check keeps its region column, on which no fitted person is 1: it is
    held at 0 and not estimated. If the first region (the reference) was left out, the first
    region still fitting becomes the reference and its column is held too.
    """
    if not region:
        return ()
    held = {f"region[{r}]" for r in regions[1:] if r not in fitting}
    if regions and regions[0] not in fitting and fitting:
        held.add(f"region[{fitting[0]}]")
    return tuple(c for c in columns if c in held)


def _coefficients(
    columns: tuple[str, ...],
    beta: glm.Vector,
    dp_cov: glm.Matrix,
    sampling_cov: glm.Matrix,
    weak: npt.NDArray[np.bool_],
) -> tuple[FittedCoefficient, ...]:
    dp, total = glm.standard_errors(dp_cov, sampling_cov)
    # No interval it cannot stand behind: infinite SEs, the interval the whole line.
    dp = np.where(weak, math.inf, dp)
    total = np.where(weak, math.inf, total)
    return tuple(
        FittedCoefficient(
            column=c,
            estimate=float(b),
            dp_std_error=float(d),
            std_error=float(t),
            ci_low=float(b - Z95 * t),
            ci_high=float(b + Z95 * t),
        )
        for c, b, d, t in zip(columns, beta, dp, total, strict=True)
    )


def solve(
    model: ModelSpec,
    design: Sequence[StepRelease],
    fitting: Sequence[str],
    ask: AskStep,
    *,
    all_regions: Sequence[str] = (),
) -> Solution:
    """Fit a model from the design check's releases and Newton steps obtained through ask.

    fitting are the nodes that passed the design check, and all_regions every node the
    design was planned with (default: the same), in the hub's order; ask(step, b) returns
    the fitting nodes' releases of Newton step `step` at coefficients b.
    """
    summed = glm.sum_releases(design)
    columns = summed.columns
    if not columns or columns[0] != INTERCEPT:
        raise QueryError(f"the design's first column must be {INTERCEPT!r}")
    held = held_columns(columns, all_regions or fitting, fitting, model.region)
    active = np.array([i for i, c in enumerate(columns) if c not in held], dtype=np.intp)
    kept = tuple(columns[i] for i in active)
    beta, n = glm.start(model.family, summed)
    persons = round(n)
    notes: list[str] = []
    if held:
        notes.append(
            f"not estimated, their regions being left out: {', '.join(held)}; the region "
            f"reference is {fitting[0]}"
        )
    if model.family is Family.GAUSSIAN:
        stats = glm.sum_releases(ask(1, ()))
        _check_columns(stats, columns)
        ls = glm.least_squares(stats, active)
        notes.insert(0, f"least squares in one step; residual sd {math.sqrt(ls.sigma2):.4g}")
        if ls.repaired:
            notes.append(_repaired(1, "X'X"))
        if ls.floored_rss:
            notes.append("noise took the residual sum of squares below its noise sd; floored")
        if ls.weak.any():
            notes.insert(0, _weak(kept, ls.weak, "X'X", stats.sd("xtx")))
        return Solution(
            coefficients=_coefficients(kept, ls.beta, ls.dp_cov, ls.sampling_cov, ls.weak),
            iterations=(FitIterationInfo(step=1, max_change=0.0, repaired=ls.repaired),),
            persons=persons,
            message="; ".join(notes),
        )
    iterations: list[FitIterationInfo] = []
    step: glm.Step | None = None
    for k in range(1, model.newton_steps + 1):
        stats = glm.sum_releases(ask(k, tuple(float(b) for b in beta)))
        _check_columns(stats, columns)
        if model.family is Family.POISSON and k == 1 and model.newton_steps > 1:
            # Not at a last step, whose noise the standard errors describe as released.
            beta, stats, shift = glm.recentre_poisson(beta, stats)
            notes.append(f"step 1: the intercept was first re-centred by {shift:.3g}")
        step = glm.newton(beta, stats, active, model.family)
        dp, total = glm.standard_errors(step.dp_cov, glm.inverse(step.hessian))
        moved = np.abs(step.change[active])
        change = float(np.max(moved / np.maximum(total, 1e-300)))
        settled = bool(np.all(moved <= np.maximum(CONVERGED_SES * total, NOISE_SES * dp)))
        iterations.append(FitIterationInfo(step=k, max_change=change, repaired=step.repaired))
        if step.repaired:
            notes.append(_repaired(k, "Hessian"))
        if step.damped:
            notes.append(
                f"step {k}: damped so that no linear predictor moved by more than "
                f"{glm.MAX_ETA_STEP[model.family]:g}"
            )
        beta = step.beta
    if step is None:  # unreachable: a ModelSpec takes at least one Newton step
        raise QueryError("a model needs at least one Newton step")
    last = iterations[-1].max_change
    if not settled or step.damped:
        notes.insert(
            0,
            f"not converged: the last step moved a coefficient by {last:.3g} standard errors, "
            f"more than {CONVERGED_SES:g} and than {NOISE_SES:g} DP-only ones; fit again with "
            "more iterations",
        )
    else:
        notes.insert(
            0,
            f"converged: the last step moved each coefficient by at most {last:.3g} SE, within "
            "its noise",
        )
    if step.weak.any():
        notes.insert(0, _weak(kept, step.weak, "Hessian", stats.sd("hessian")))
    # The last Hessian was evaluated one (converged, so small) step from these coefficients.
    coefficients = _coefficients(
        kept, beta[active], step.dp_cov, glm.inverse(step.hessian), step.weak
    )
    final = tuple(float(b) for b in beta)
    return Solution(coefficients, tuple(iterations), persons, "; ".join(notes), beta=final)


def _weak(kept: tuple[str, ...], weak: npt.NDArray[np.bool_], what: str, sd: float) -> str:
    names = ", ".join(c for c, w in zip(kept, weak, strict=True) if w)
    floor = glm.EIGEN_FLOOR_SDS * math.sqrt(len(kept)) * sd
    return (
        f"no interval for {names}: along them the last {what}'s curvature is below its noise "
        f"({floor:.3g}, {glm.EIGEN_FLOOR_SDS:g} sqrt(p) noise sds), so their noise cannot be "
        "estimated; give the model more rho, or drop or merge near-collinear covariates "
        "(such as a number and bands of it)"
    )


def _repaired(step: int, what: str) -> str:
    return (
        f"step {step}: the noisy {what} was not positive definite; its eigenvalues were "
        f"floored at {glm.EIGEN_FLOOR_SDS:g} sqrt(p) noise sds"
    )


def _check_columns(stats: glm.Summed, columns: tuple[str, ...]) -> None:
    if stats.columns != columns:
        raise QueryError(
            f"step {stats.step}: the nodes' design columns {list(stats.columns)} differ from "
            f"the design check's {list(columns)}"
        )
