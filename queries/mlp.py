"""A small neural network for binary outcomes: its parameters, scores and clipped gradients.

One hidden layer of `hidden` tanh units over the model's design columns (queries/model.py;
each entry in [0, 1], the intercept acting as the hidden units' bias), then a logistic
output: z = w2 . tanh(W1 x) + b2, P(y = 1) = 1 / (1 + exp(-z)), z clamped to +-ETA_LIMIT.
The parameter vector is W1 row by row (unit k, design column j), then w2, then b2.

The DP release of a round is the sum over persons of each person's log-likelihood gradient
clipped to L2 norm `clip` (a person with several rows has one gradient, the sum over their
rows: a patient is one example), each clipped gradient rounded to whole fixed-point units
before summing. So adding or removing one person moves the sum by at most
clip / unit + sqrt(P) / 2 units in L2 (rounding moves each of P entries by at most half a
unit): `clipped_sensitivity`. Pure numpy on arrays the node has already read; nothing here
reads data or draws noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

ETA_LIMIT = 30.0
# Parameters start where a run's hub sets them: W1 ~ N(0, 1 / p), w2 ~ N(0, 1 / h), b2 at the
# design check's noisy event rate. The seed is fixed and public (it is not a secret, and the
# same start everywhere makes runs comparable).
INIT_SEED = 20_241_201


def count(p: int, hidden: int) -> int:
    """How many parameters a network over p design columns with `hidden` units has."""
    return hidden * p + hidden + 1


def names(columns: Sequence[str], hidden: int) -> tuple[str, ...]:
    """Each parameter's name, in the vector's order."""
    out = [f"hidden{k}:{c}" for k in range(hidden) for c in columns]
    out += [f"output:hidden{k}" for k in range(hidden)]
    out.append("output:(bias)")
    return tuple(out)


def _unpack(theta: Array, p: int, hidden: int) -> tuple[Array, Array, float]:
    if theta.shape != (count(p, hidden),):
        raise ValueError(f"expected {count(p, hidden)} parameters, got {theta.shape}")
    w1 = theta[: hidden * p].reshape(hidden, p)
    w2 = theta[hidden * p : hidden * p + hidden]
    return w1, w2, float(theta[-1])


def logits(theta: Array, x: Array, hidden: int) -> Array:
    """z for every row of x (clamped to +-ETA_LIMIT)."""
    w1, w2, b2 = _unpack(theta, x.shape[1], hidden)
    z: Array = np.clip(np.tanh(x @ w1.T) @ w2 + b2, -ETA_LIMIT, ETA_LIMIT)
    return z


def row_gradients(theta: Array, x: Array, y: Array, hidden: int) -> tuple[Array, Array]:
    """Per row: the gradient of the log-likelihood (rows x P), and the mean mu."""
    w1, w2, b2 = _unpack(theta, x.shape[1], hidden)
    a = np.tanh(x @ w1.T)
    z = np.clip(a @ w2 + b2, -ETA_LIMIT, ETA_LIMIT)
    mu = 1.0 / (1.0 + np.exp(-z))
    r = y - mu
    back = (r[:, None] * w2[None, :]) * (1.0 - a * a)  # rows x hidden
    g_w1 = (back[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)
    grads: Array = np.concatenate([g_w1, r[:, None] * a, r[:, None]], axis=1)
    return grads, mu


def clipped_person_sums(grads: Array, persons: npt.NDArray[np.int64], clip: float) -> Array:
    """Each person's gradient (the sum over their rows), scaled down to L2 norm <= clip."""
    _, index = np.unique(persons, return_inverse=True)
    summed = np.zeros((int(index.max()) + 1 if index.size else 0, grads.shape[1]))
    np.add.at(summed, index, grads)
    norms = np.linalg.norm(summed, axis=1)
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    out: Array = summed * scale[:, None]
    return out


def clipped_sum_units(
    theta: Array,
    x: Array,
    y: Array,
    persons: npt.NDArray[np.int64],
    *,
    hidden: int,
    clip: float,
    exponent: int,
) -> list[int]:
    """The round's exact release: clipped per-person gradients, each rounded to units, summed."""
    if x.shape[0] == 0:
        return [0] * count(x.shape[1], hidden)
    grads, _ = row_gradients(theta, x, y, hidden)
    units = to_units(clipped_person_sums(grads, persons, clip), exponent)
    return [int(v) for v in units.sum(axis=0)]


def to_units(values: Array, exponent: int) -> Array:
    """Each value in whole units of 10**exponent, half away from zero (as the SQL's ROUND)."""
    scaled = values / 10.0**exponent
    out: Array = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return out


def clipped_sensitivity(clip: float, exponent: int, parameters: int) -> float:
    """L2 sensitivity in units of the rounded clipped sum (module docstring), whole."""
    return float(math.ceil(clip / 10.0**exponent + math.sqrt(parameters) / 2))


def initial(p: int, hidden: int, event_rate: float) -> Array:
    """The public starting point (see INIT_SEED)."""
    rng = np.random.default_rng(INIT_SEED)
    rate = min(max(event_rate, 1e-3), 1 - 1e-3)
    theta: Array = np.concatenate(
        [
            rng.normal(0.0, 1.0 / math.sqrt(p), hidden * p),
            rng.normal(0.0, 1.0 / math.sqrt(hidden), hidden),
            [math.log(rate / (1 - rate))],
        ]
    )
    return theta
