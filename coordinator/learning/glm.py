"""The hub's GLM arithmetic on summed noisy statistics: pure numpy, no transport, no state.

Every function takes the statistics the nodes released (summed across nodes: the noise of
independent nodes adds, so the variances add too) and returns numbers; the loop that asks
the nodes for them is coordinator/learning/fit.py. The conventions are those of
queries/model.py: the gradient is sum_i x_i (y_i - mu_i), the Hessian is the Fisher
information sum_i w_i x_i x_i' (positive definite for a full-rank design), sent as its upper
triangle, row-major; a Newton step is b + H^-1 g.

What noise breaks, and how it is repaired (docs/models.md, "Repairs"):

- a noisy Hessian (or X'X) is symmetric by construction (only its upper triangle is sent),
  but may not be positive definite. Then every eigenvalue below the floor
  EIGEN_FLOOR_SDS * sqrt(p) * sd (sd: the noise sd of one entry; 2 sqrt(p) sd is the
  typical spectral norm of a p x p symmetric noise matrix, so an eigenvalue below it cannot
  be told from 0) is raised to the floor, and the step is reported as repaired;
- a Newton step is damped so that no person's linear predictor moves by more than
  MAX_ETA_STEP[family] (every design entry is in [0, 1] and a person has at most one level
  of each category, so |x'd| is at most the sum of |d_j| over the intercept and numbers plus
  each category's largest |d_j|, `reach`): far from the optimum a full step on the log scale
  can overshoot by orders of magnitude, and near it the cap never binds;
- a Gaussian residual sum of squares that noise drives below its floor is floored.

What noise cannot repair: a direction of the design whose curvature (an eigenvalue of the
Hessian) is below that same floor cannot be told from 0, so the noise's share of the
coefficients along it, which scales as 1 / curvature, cannot be estimated either (the delta
method assumes the noise is small against the curvature). Coefficients that load on such a
direction (`weak`) get no interval (docs/models.md, "When the budget is too small").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from queries.errors import DataError, QueryError
from queries.model import Family, StepRelease

Vector = npt.NDArray[np.float64]
Matrix = npt.NDArray[np.float64]
Indices = npt.NDArray[np.intp]

# An eigenvalue below this many times sqrt(p) noise sds is floored there (see above).
EIGEN_FLOOR_SDS = 2.0
# A coefficient whose axis has more than this share of its length on directions whose
# curvature is below the floor (sum of squared eigenvector entries) gets no interval: a true
# curvature k times below the floor makes their noise k times larger than any estimate.
WEAK_LOADING = 0.001
# The largest change of any person's linear predictor in one Newton step: a factor of e^5
# (about 150) in a rate, whose exp() overshoots fastest; a logit saturates instead, so its
# cap only guards against wild noise.
MAX_ETA_STEP: dict[Family, float] = {Family.POISSON: 5.0, Family.BINOMIAL: 10.0}
# The 97.5% point of the standard normal: 95% intervals.
Z95 = 1.959963984540054


# A compare_by model's per-unit vectors, which are not the design's (coordinator/learning/units.py).
UNIT_VECTORS = frozenset({"unit_outcome", "unit_residual"})


@dataclass(frozen=True)
class Summed:
    """One step's statistics summed across nodes, with the noise variance of each entry."""

    step: int
    columns: tuple[str, ...]
    vectors: Mapping[str, Vector]
    variances: Mapping[str, float]
    nodes: tuple[str, ...]

    def vector(self, name: str, length: int) -> Vector:
        """A summed vector by name, checked to hold `length` entries."""
        if name not in self.vectors:
            raise DataError(f"step {self.step}: the nodes released no {name!r} statistic")
        v = self.vectors[name]
        if v.shape != (length,):
            raise DataError(
                f"step {self.step}: {name!r} has {v.shape[0]} entries, expected {length} "
                f"for {len(self.columns)} design columns"
            )
        return v

    def sd(self, name: str) -> float:
        """The noise sd of one entry of a summed vector."""
        return math.sqrt(self.variances.get(name, 0.0))


def sum_releases(releases: Sequence[StepRelease]) -> Summed:
    """Sum the nodes' releases of one step; refuse releases that disagree on their shape."""
    if not releases:
        raise DataError("no node released this step")
    first = releases[0]
    vectors: dict[str, Vector] = {}
    variances: dict[str, float] = {}
    for r in releases:
        if r.step != first.step:
            raise DataError(f"node {r.node} answered step {r.step}, expected {first.step}")
        if r.columns != first.columns:
            raise DataError(
                f"node {r.node} has design columns {list(r.columns)}, but node {first.node} "
                f"has {list(first.columns)}: the nodes do not agree on the design"
            )
        if set(r.vectors) != set(first.vectors):
            raise DataError(
                f"node {r.node} released {sorted(r.vectors)}, node {first.node} "
                f"{sorted(first.vectors)}"
            )
        for name, values in r.vectors.items():
            if name in UNIT_VECTORS:
                continue  # per level of each node's own units: summed by units.py
            v = np.asarray(values, dtype=np.float64)
            if not np.all(np.isfinite(v)):
                raise DataError(f"node {r.node} released a non-finite {name!r}")
            if name in vectors and vectors[name].shape != v.shape:
                raise DataError(f"node {r.node}: {name!r} has {v.shape[0]} entries")
            vectors[name] = vectors[name] + v if name in vectors else v
            variance = float(r.variances.get(name, 0.0))
            if not (math.isfinite(variance) and variance >= 0):
                raise DataError(f"node {r.node} reported an impossible noise variance {name!r}")
            variances[name] = variances.get(name, 0.0) + variance
    return Summed(
        step=first.step,
        columns=first.columns,
        vectors=vectors,
        variances=variances,
        nodes=tuple(r.node for r in releases),
    )


def inverse(m: Matrix) -> Matrix:
    """The inverse of a (repaired, positive definite) matrix."""
    return np.asarray(np.linalg.inv(m), dtype=np.float64)


def triangle_size(p: int) -> int:
    """Entries in the upper triangle of a p x p matrix."""
    return p * (p + 1) // 2


def symmetric(upper: Vector, p: int) -> Matrix:
    """The symmetric matrix whose upper triangle (row-major) is `upper`."""
    m = np.zeros((p, p))
    m[np.triu_indices(p)] = upper
    return m + np.triu(m, 1).T


def repair(matrix: Matrix, sd: float, what: str) -> tuple[Matrix, bool]:
    """Floor the eigenvalues of a noisy symmetric matrix (see the module docstring).

    With no noise (sd 0) nothing is repaired: a matrix that is not positive definite then
    means a design with a column that no person varies on, which is refused.
    """
    p = matrix.shape[0]
    values, vectors = np.linalg.eigh(matrix)
    floor = EIGEN_FLOOR_SDS * math.sqrt(p) * sd
    if sd == 0:
        if values[0] <= 1e-12 * max(1.0, abs(values[-1])):
            raise QueryError(
                f"the design's {what} is singular: a covariate level or region has no persons, "
                "or two columns are collinear; drop or merge that covariate"
            )
        return matrix, False
    if values[0] > 0:
        # Positive definite: left as released (flooring a true small eigenvalue would bias).
        return matrix, False
    floored = np.maximum(values, floor)
    return (vectors * floored) @ vectors.T, True


def floored_inverse(matrix: Matrix, sd: float) -> Matrix:
    """The inverse of a symmetric matrix with every eigenvalue raised to the repair floor."""
    values, vectors = np.linalg.eigh(matrix)
    floor = EIGEN_FLOOR_SDS * math.sqrt(matrix.shape[0]) * sd
    if sd == 0:
        return inverse(matrix)
    return np.asarray((vectors / np.maximum(values, floor)) @ vectors.T, dtype=np.float64)


def weak_columns(matrix: Matrix, sd: float) -> npt.NDArray[np.bool_]:
    """Columns loading on directions of a noisy matrix whose eigenvalue is below the floor."""
    if sd == 0:
        return np.zeros(matrix.shape[0], dtype=np.bool_)
    values, vectors = np.linalg.eigh(matrix)
    below = values < EIGEN_FLOOR_SDS * math.sqrt(matrix.shape[0]) * sd
    loading = (vectors[:, below] ** 2).sum(axis=1)
    return np.asarray(loading > WEAK_LOADING, dtype=np.bool_)


def link(family: Family, mean: float) -> float:
    """The canonical link of a mean."""
    if family is Family.BINOMIAL:
        return math.log(mean / (1 - mean))
    if family is Family.POISSON:
        return math.log(mean)
    return mean


def start(family: Family, design: Summed) -> tuple[Vector, float]:
    """Starting coefficients from the design check, and its (noisy) pooled n.

    The intercept is the link of the pooled outcome mean (kept inside the link's domain,
    half a person from its edges), every other coefficient 0: the null model's fit.
    """
    p = len(design.columns)
    n = max(1.0, float(design.vector("n", 1)[0]))
    mean = float(design.vector("outcome_sum", 1)[0]) / n
    edge = 0.5 / n
    if family is Family.BINOMIAL:
        mean = min(max(mean, edge), 1 - edge)
    elif family is Family.POISSON:
        mean = max(mean, edge)
    beta = np.zeros(p)
    beta[0] = link(family, mean)
    return beta, n


def recentre_poisson(beta: Vector, stats: Summed) -> tuple[Vector, Summed, float]:
    """Move a Poisson fit's intercept to where it is exact for the other coefficients.

    Under the log link a shift c of the intercept scales every mu by e^c, so the statistics
    at b + c e_0 follow from those at b: the Hessian scales by e^c and, since the intercept
    row of the Hessian is X'mu, the gradient becomes g + (1 - e^c) H[0, :]. The best c is
    log(Y / M), Y = g_0 + H_00 the outcome sum and M = H_00 the sum of mu. It fixes the start,
    which knows the outcome mean but not the offset's (the design check does not release it).
    """
    p = len(stats.columns)
    gradient = stats.vector("gradient", p)
    upper = stats.vector("hessian", triangle_size(p))
    row = upper[:p]  # the intercept's row of the upper triangle is the whole first row
    total_mu = max(float(row[0]), 1e-300)
    outcome = max(float(gradient[0] + row[0]), 0.5)
    shift = math.log(outcome / total_mu)
    scale = math.exp(shift)
    vectors = dict(stats.vectors)
    vectors["gradient"] = gradient + (1 - scale) * row
    vectors["hessian"] = upper * scale
    moved = beta.copy()
    moved[0] += shift
    variances = dict(stats.variances)
    variances["hessian"] = variances.get("hessian", 0.0) * scale**2
    return moved, Summed(stats.step, stats.columns, vectors, variances, stats.nodes), shift


@dataclass(frozen=True)
class Step:
    """The outcome of one Newton step at the hub."""

    beta: Vector
    change: Vector  # the step taken (after damping)
    hessian: Matrix  # the repaired Fisher information at the previous coefficients
    dp_cov: Matrix  # the noise's covariance of the new coefficients (delta method)
    repaired: bool
    damped: bool
    weak: npt.NDArray[np.bool_]  # per active column: its noise is not estimable (above)


def _delta_noise(hinv: Matrix, rhs: Vector, var_rhs: float, var_m: float) -> Matrix:
    """Covariance of x = M^-1 r caused by independent noise on r and M's upper triangle.

    First order: dx = M^-1 dr - M^-1 dM x. An entry (j, k) of the upper triangle moves both
    M[j, k] and M[k, j], so its column is -(M^-1[:, j] x_k + M^-1[:, k] x_j) for j < k and
    -M^-1[:, j] x_j on the diagonal.
    """
    p = hinv.shape[0]
    x = hinv @ rhs
    cov = var_rhs * (hinv @ hinv.T)
    if var_m > 0:
        j, k = np.triu_indices(p)
        cols = hinv[:, j] * x[k] + np.where(j != k, 1.0, 0.0) * hinv[:, k] * x[j]
        cov = cov + var_m * (cols @ cols.T)
    return cov


def _newton_noise(hinv: Matrix, var_g: float, var_h: float, floored: Matrix) -> Matrix:
    """Covariance of the coefficients after a Newton step caused by the noise (delta method).

    Near the fit b*, b_new - b* = H~^-1 e_g + H~^-1 E_H (b* - b_old) to first order in each
    noise: the gradient's noise e_g, and the Hessian's E_H times how far the previous
    coefficients were, itself the previous step's noise. The earlier steps' noise shrinks
    quadratically, so the last step's is what remains. With independent entries of variance
    var_h on the upper triangle, E[E C E'] = var_h (C - diag(C) + tr(C) I) for any C, and
    the steps' noise is alike (they share the budget equally), so the previous error's
    covariance C is taken to be this step's gradient term, with the Hessian's eigenvalues
    floored (`floored`: the inverse of the Hessian floored as repair() floors it): along a
    direction whose curvature is below the floor the error is not estimable (weak_columns),
    and 1 / a noisy curvature near 0 would spread its huge, wrong estimate to every
    coefficient (measured: intervals of twice the width needed on the known model at rho 1).
    """
    gradient_term = var_g * (hinv @ hinv.T)
    if var_h == 0:
        return gradient_term
    c = var_g * (floored @ floored.T)
    spread: Matrix = c - np.diag(np.diag(c)) + float(np.trace(c)) * np.eye(c.shape[0])
    return gradient_term + var_h * (hinv @ spread @ hinv.T)


def active_all(p: int) -> Indices:
    """Every column of a p-column design is estimated."""
    return np.arange(p)


def reach(columns: Sequence[str], change: Vector) -> float:
    """The largest |x'd| over designs x in [0, 1] with one level per category (see above)."""
    groups: dict[str, float] = {}
    alone = 0.0
    for name, d in zip(columns, np.abs(change), strict=True):
        if name.endswith("]") and "[" in name:
            key = name[: name.index("[")]
            groups[key] = max(groups.get(key, 0.0), float(d))
        else:
            alone += float(d)
    return alone + sum(groups.values())


def newton(
    beta: Vector, stats: Summed, active: Indices | None = None, family: Family = Family.BINOMIAL
) -> Step:
    """One Newton step from the coefficients the nodes evaluated at.

    Only the active columns are estimated; the others (a region left out of the fit) are
    held at 0, and the matrices returned are over the active columns only.
    """
    p = len(stats.columns)
    active = active_all(p) if active is None else active
    gradient = stats.vector("gradient", p)[active]
    full = symmetric(stats.vector("hessian", triangle_size(p)), p)
    released = full[np.ix_(active, active)]
    hessian, repaired = repair(released, stats.sd("hessian"), "Hessian")
    hinv = inverse(hessian)
    change = np.zeros(p)
    change[active] = hinv @ gradient
    cap = MAX_ETA_STEP.get(family, math.inf)
    most = reach(stats.columns, change)
    damped = most > cap
    if damped:
        change = change * (cap / most)
    dp_cov = _newton_noise(
        hinv,
        stats.variances.get("gradient", 0.0),
        stats.variances.get("hessian", 0.0),
        floored_inverse(released, stats.sd("hessian")),
    )
    return Step(
        beta=beta + change,
        change=change,
        hessian=hessian,
        dp_cov=dp_cov,
        repaired=repaired,
        damped=damped,
        weak=weak_columns(released, stats.sd("hessian")),
    )


@dataclass(frozen=True)
class LeastSquares:
    """A Gaussian model solved from noisy X'X, X'y, y'y and n."""

    beta: Vector
    dp_cov: Matrix
    sampling_cov: Matrix
    sigma2: float
    repaired: bool  # X'X needed an eigenvalue floor
    floored_rss: bool  # the residual sum of squares was floored
    weak: npt.NDArray[np.bool_]  # per active column: its noise is not estimable (above)


def least_squares(stats: Summed, active: Indices | None = None) -> LeastSquares:
    """Solve the normal equations; the residual variance is RSS / (n - p).

    Over the active columns only (the others are held at 0), as newton() does.
    """
    active = active_all(len(stats.columns)) if active is None else active
    full = symmetric(stats.vector("xtx", triangle_size(len(stats.columns))), len(stats.columns))
    xtx, repaired = repair(full[np.ix_(active, active)], stats.sd("xtx"), "X'X")
    xty = stats.vector("xty", len(stats.columns))[active]
    p = len(active)
    yty = float(stats.vector("yty", 1)[0])
    n = float(stats.vector("n", 1)[0])
    inv = inverse(xtx)
    beta = inv @ xty
    rss = yty - 2 * float(beta @ xty) + float(beta @ xtx @ beta)
    # A sum of squares is positive: noise can take it below what it can tell from 0.
    rss_floor = max(stats.sd("yty"), 1e-300)
    floored = rss < rss_floor
    if floored:
        rss = rss_floor
    df = n - p
    if df < 1:
        raise QueryError(
            f"a Gaussian model needs more persons than its {p} parameters (the pooled n is "
            f"about {n:.0f})"
        )
    sigma2 = rss / df
    return LeastSquares(
        beta=beta,
        dp_cov=_delta_noise(
            inv, xty, stats.variances.get("xty", 0.0), stats.variances.get("xtx", 0.0)
        ),
        sampling_cov=sigma2 * inv,
        sigma2=sigma2,
        repaired=repaired,
        floored_rss=floored,
        weak=weak_columns(full[np.ix_(active, active)], stats.sd("xtx")),
    )


def standard_errors(dp_cov: Matrix, sampling_cov: Matrix) -> tuple[Vector, Vector]:
    """The DP-only standard errors and the total (DP + sampling) ones."""
    dp = np.sqrt(np.maximum(np.diag(dp_cov), 0.0))
    total = np.sqrt(np.maximum(np.diag(dp_cov + sampling_cov), 0.0))
    return dp, total
