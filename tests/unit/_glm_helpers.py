"""Exact GLM statistics computed in numpy, as a node would release them with no noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from queries.model import Family, StepRelease

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Data:
    """A design (entries in [0, 1], intercept first), an outcome and an optional offset."""

    columns: tuple[str, ...]
    x: Array
    y: Array
    offset: Array | None

    @property
    def eta_offset(self) -> Array:
        return np.zeros(len(self.y)) if self.offset is None else self.offset


def make_data(family: Family, n: int, rng: np.random.Generator, *, offset: bool = False) -> Data:
    """Persons with a 3-level category, a numeric covariate in [0, 1] and a known model."""
    level = rng.integers(0, 3, size=n)
    age = rng.uniform(0, 1, size=n)
    x = np.column_stack([np.ones(n), (level == 1).astype(float), (level == 2).astype(float), age])
    columns = ("(intercept)", "band[b]", "band[c]", "age")
    off = np.log(rng.uniform(0.5, 3.0, size=n)) if offset else None
    eta = x @ np.array([-0.5, 0.4, -0.3, 0.8]) + (0 if off is None else off)
    if family is Family.BINOMIAL:
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
    elif family is Family.POISSON:
        y = rng.poisson(np.exp(eta)).astype(float)
    else:
        y = eta + rng.normal(0, 0.7, size=n)
    return Data(columns, x, y, off)


def _mu(family: Family, eta: Array) -> Array:
    if family is Family.BINOMIAL:
        return 1 / (1 + np.exp(-eta))
    if family is Family.POISSON:
        return np.exp(eta)
    return eta


def _weight(family: Family, mu: Array) -> Array:
    if family is Family.BINOMIAL:
        return mu * (1 - mu)
    if family is Family.POISSON:
        return mu
    return np.ones_like(mu)


def upper(m: Array) -> tuple[float, ...]:
    """The upper triangle of a square matrix, row-major."""
    return tuple(float(v) for v in m[np.triu_indices(m.shape[0])])


def exact_vectors(
    data: Data, family: Family, step: int, beta: Sequence[float]
) -> dict[str, tuple[float, ...]]:
    """The statistics of one step, exactly (queries/model.py's docstring)."""
    x, y = data.x, data.y
    if step == 0:
        counts = x.sum(axis=0)
        counts[3] = 0.0  # a numeric column's level count is 0
        return {
            "n": (float(len(y)),),
            "level_counts": tuple(float(c) for c in counts),
            "outcome_sum": (float(y.sum()),),
        }
    if family is Family.GAUSSIAN:
        z = y - data.eta_offset
        return {
            "xtx": upper(x.T @ x),
            "xty": tuple(float(v) for v in x.T @ z),
            "yty": (float(z @ z),),
            "n": (float(len(y)),),
        }
    mu = _mu(family, x @ np.asarray(beta) + data.eta_offset)
    w = _weight(family, mu)
    return {
        "gradient": tuple(float(v) for v in x.T @ (y - mu)),
        "hessian": upper((x * w[:, None]).T @ x),
    }


def release(
    data: Data,
    family: Family,
    step: int,
    beta: Sequence[float],
    *,
    node: str = "a",
    variances: dict[str, float] | None = None,
    rng: np.random.Generator | None = None,
) -> StepRelease:
    """One node's release: exact, or with Gaussian noise of the given variance per entry."""
    vectors = exact_vectors(data, family, step, beta)
    variances = {k: (variances or {}).get(k, 0.0) for k in vectors}
    if rng is not None:
        vectors = {
            k: tuple(np.asarray(v) + rng.normal(0, np.sqrt(variances[k]), size=len(v)))
            for k, v in vectors.items()
        }
    return StepRelease(
        node=node, step=step, columns=data.columns, vectors=vectors, variances=variances, rho=0.0
    )
