"""Gradient descent for a DP logistic model, and the held-out AUC; transport-free.

A model with solver "gradient" (queries/model.py) is trained in rounds: at each round the
nodes release the noisy gradient sum x (y - mu) over their training rows at the hub's
coefficients, and the noisy training loss (queries/model_plan.py). The hub takes a
preconditioned step with momentum (heavy ball):

    v <- MOMENTUM v + (STEP / q) D^-1 g,    b <- b + v

with D the diagonal of the logistic Hessian's bound X'X / 4 as the design check gives it
(n for the intercept, each level's noisy count, n / 3 for a number scaled to [0, 1]), and q
the most design entries a row can have that are not 0: for H = X'WX with at most q non-zero
entries a row, the Jacobi-scaled curvature D^-1/2 H D^-1/2 has its largest eigenvalue at
most about q, so STEP / q keeps the plain step stable and momentum makes up for its
caution. It is a first-order method on purpose: the point of training over rounds is models
whose Hessian is not released (the GLM of coordinator/learning/fit.py is the second-order
one, over chc's own protocol). `descend` asks for each round's releases through a callable,
so it runs the same over Flower (coordinator/learning/flower/train.py) or a test's exact
statistics.

The held-out AUC comes from the evaluation step's two noisy histograms of the linear
predictor (events, others) over a range the hub picks from public figures (`score_range`:
the design check's noisy means give eta's mean and spread; 4 sds either side, within the
least and greatest eta the coefficients allow): the Mann-Whitney statistic over bins, ties
within a bin counted one half. The noisy counts are used as they are, negative ones too:
the statistic is a sum of products of counts from independent noises, so unclipped it has
no noise bias, where clipping at 0 would pile noise into the empty tails and pull the AUC to
one half. It is a point estimate (binning and noise move it a little); no interval is
printed for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.learning import glm
from queries import mlp
from queries.errors import DataError, QueryError
from queries.model import INTERCEPT, ModelSpec, StepRelease
from queries.model_plan import SCORE_BINS

STEP = 2.0
MOMENTUM = 0.5
# A number's diagonal entry of X'X per person: x scaled to [0, 1], E[x^2] = 1/3 if uniform;
# its mean and variance, for the score range, likewise (the hub has no release of either).
NUMERIC_SECOND_MOMENT = 1.0 / 3.0
NUMERIC_MEAN, NUMERIC_VARIANCE = 0.5, 1.0 / 12.0
SCORE_SDS = 4.0

AskRound = Callable[[int, Sequence[float]], Sequence[StepRelease]]


@dataclass(frozen=True)
class RoundInfo:
    """One round: the noisy mean training loss per row and the size of the step taken."""

    round: int
    loss: float  # nats per training row (noisy), each row's loss capped
    step_norm: float


@dataclass(frozen=True)
class Descent:
    """Where gradient descent ended: coefficients in design order, and every round."""

    columns: tuple[str, ...]
    coefficients: tuple[float, ...]
    rounds: tuple[RoundInfo, ...]
    persons: int  # the noisy training n of the design check
    score_range: tuple[float, float]  # for the evaluation's histograms


def _scale(design: glm.Summed) -> np.ndarray:
    """D: the diagonal of X'X / 4 from the design check's counts (see the module docstring)."""
    n = max(float(design.vector("n", 1)[0]), 1.0)
    counts = design.vector("level_counts", len(design.columns))
    out = np.empty(len(design.columns))
    for j, column in enumerate(design.columns):
        if column == INTERCEPT:
            out[j] = n
        elif "[" in column:
            out[j] = max(float(counts[j]), 1.0)
        else:
            out[j] = n * NUMERIC_SECOND_MOMENT
    return 0.25 * out


def _start(design: glm.Summed) -> np.ndarray:
    """The intercept at the noisy event rate, every other coefficient at 0."""
    n = max(float(design.vector("n", 1)[0]), 1.0)
    events = float(design.vector("outcome_sum", 1)[0])
    rate = min(max(events / n, 1e-3), 1 - 1e-3)
    beta = np.zeros(len(design.columns))
    beta[design.columns.index(INTERCEPT)] = math.log(rate / (1 - rate))
    return beta


def descend(
    model: ModelSpec, design: Sequence[StepRelease], nonzero: int, ask: AskRound
) -> Descent:
    """Train from the design check's releases; ask(k, b) gives round k's releases at b."""
    if model.solver != "gradient":
        raise QueryError("descend trains models whose solver is 'gradient'")
    summed = glm.sum_releases(design)
    if not summed.columns or summed.columns[0] != INTERCEPT:
        raise DataError(f"the design's first column must be {INTERCEPT!r}")
    p = len(summed.columns)
    scale = _scale(summed)
    beta = _start(summed)
    velocity = np.zeros(p)
    n = max(float(summed.vector("n", 1)[0]), 1.0)
    rounds: list[RoundInfo] = []
    for k in range(1, model.newton_steps + 1):
        stats = glm.sum_releases(ask(k, tuple(float(b) for b in beta)))
        if stats.columns != summed.columns:
            raise DataError(f"round {k}: the nodes' design columns differ from the design's")
        gradient = stats.vector("gradient", p)
        loss = float(stats.vector("loss", 1)[0]) / n
        velocity = MOMENTUM * velocity + (STEP / max(nonzero, 1)) * gradient / scale
        beta = beta + velocity
        rounds.append(RoundInfo(round=k, loss=loss, step_norm=float(np.linalg.norm(velocity))))
    return Descent(
        columns=summed.columns,
        coefficients=tuple(float(b) for b in beta),
        rounds=tuple(rounds),
        persons=round(n),
        score_range=score_range(summed, beta),
    )


# A network (hidden > 0) is trained with Adam on the noisy mean gradient (per-person clipped
# sums over the noisy n): the curvature bound that scales the logistic step has no
# counterpart for it. Measured on the synthetic COPD pathway, 8 hidden units reach the
# logistic model's ranking in about 10 rounds at this rate.
ADAM_RATE = 0.1
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# The network's score histograms cover b2 +- this (or less, if |w2| sums to less): the
# logit of most patients' risk lies within 3 of the average one's.
NETWORK_SCORE_HALF_WIDTH = 3.0


def descend_network(model: ModelSpec, design: Sequence[StepRelease], ask: AskRound) -> Descent:
    """Train a network (queries/mlp.py) with Adam; ask(k, theta) gives round k's releases."""
    if model.solver != "gradient" or not model.hidden:
        raise QueryError("descend_network trains models with solver 'gradient' and hidden > 0")
    summed = glm.sum_releases(design)
    if not summed.columns or summed.columns[0] != INTERCEPT:
        raise DataError(f"the design's first column must be {INTERCEPT!r}")
    p, h = len(summed.columns), model.hidden
    n = max(float(summed.vector("n", 1)[0]), 1.0)
    events = float(summed.vector("outcome_sum", 1)[0])
    theta = mlp.initial(p, h, events / n)
    size = mlp.count(p, h)
    m, v = np.zeros(size), np.zeros(size)
    b1, b2 = ADAM_BETAS
    rounds: list[RoundInfo] = []
    for k in range(1, model.newton_steps + 1):
        stats = glm.sum_releases(ask(k, tuple(float(t) for t in theta)))
        gradient = stats.vector("gradient", size) / n
        m = b1 * m + (1 - b1) * gradient
        v = b2 * v + (1 - b2) * gradient * gradient
        step = ADAM_RATE * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + ADAM_EPS)
        theta = theta + step
        loss = float(stats.vector("loss", 1)[0]) / n
        rounds.append(RoundInfo(round=k, loss=loss, step_norm=float(np.linalg.norm(step))))
    bias = float(theta[-1])
    half = max(min(NETWORK_SCORE_HALF_WIDTH, float(np.abs(theta[p * h : p * h + h]).sum())), 0.5)
    return Descent(
        columns=mlp.names(summed.columns, h),
        coefficients=tuple(float(t) for t in theta),
        rounds=tuple(rounds),
        persons=round(n),
        score_range=(bias - half, bias + half),
    )


def score_range(design: glm.Summed, beta: np.ndarray) -> tuple[float, float]:
    """Where eta lies: its mean +- SCORE_SDS sds from the design check's noisy level shares
    (categories' levels taken as independent), within the range the coefficients allow."""
    n = max(float(design.vector("n", 1)[0]), 1.0)
    counts = design.vector("level_counts", len(design.columns))
    mean = variance = 0.0
    low = high = 0.0
    by_column: dict[str, list[float]] = {}
    for j, column in enumerate(design.columns):
        b = float(beta[j])
        if column == INTERCEPT:
            mean, low, high = mean + b, low + b, high + b
        elif "[" in column:
            share = min(max(float(counts[j]) / n, 0.0), 1.0)
            mean += b * share
            variance += b * b * share * (1 - share)
            by_column.setdefault(column.split("[", 1)[0], []).append(b)
        else:
            mean += b * NUMERIC_MEAN
            variance += b * b * NUMERIC_VARIANCE
            low, high = low + min(0.0, b), high + max(0.0, b)
    for levels in by_column.values():
        low, high = low + min(0.0, *levels), high + max(0.0, *levels)
    sd = math.sqrt(variance)
    lo, hi = max(low, mean - SCORE_SDS * sd), min(high, mean + SCORE_SDS * sd)
    if not hi - lo > 1e-6:  # no spread to bin (every coefficient but the intercept 0)
        lo, hi = mean - 0.5, mean + 0.5
    return lo, hi


def auc_from_histograms(events: Sequence[float], others: Sequence[float]) -> float:
    """The AUC of scores binned in order (low to high), ties within a bin counted 1/2.

    Noisy counts are taken as they are (see the module docstring); NaN if a class is empty.
    """
    pos = np.asarray(events, dtype=np.float64)
    neg = np.asarray(others, dtype=np.float64)
    if pos.shape != neg.shape:
        raise DataError("the two score histograms differ in length")
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float(np.sum(pos * (below + 0.5 * neg)) / (total_pos * total_neg))


def auc_noise_sd(events: Sequence[float], others: Sequence[float], variance: float) -> float:
    """The DP noise sd of auc_from_histograms, to first order (delta method).

    variance is each bin count's noise variance (the same for every bin). With U the
    Mann-Whitney sum and AUC = U / (P N): d AUC / d events_j = (A_j - AUC N) / (P N), with A_j
    the others below bin j plus half of bin j's, and likewise for the others' bins.
    """
    pos = np.asarray(events, dtype=np.float64)
    neg = np.asarray(others, dtype=np.float64)
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    auc = auc_from_histograms(pos.tolist(), neg.tolist())
    below_neg = np.concatenate([[0.0], np.cumsum(neg)[:-1]]) + 0.5 * neg
    above_pos = (total_pos - np.cumsum(pos)) + 0.5 * pos
    d_pos = (below_neg - auc * total_neg) / (total_pos * total_neg)
    d_neg = (above_pos - auc * total_pos) / (total_pos * total_neg)
    return float(math.sqrt(variance * (np.sum(d_pos**2) + np.sum(d_neg**2))))


def held_out_auc(releases: Sequence[StepRelease]) -> tuple[float, float, int]:
    """The pooled held-out AUC from every node's evaluation step, its DP noise sd, and the
    noisy held-out n."""
    total = np.zeros(2 * SCORE_BINS)
    variance = 0.0
    for r in releases:
        hist = np.asarray(r.vectors.get("score_hist", ()), dtype=np.float64)
        if hist.shape != total.shape:
            raise DataError(f"node {r.node} released no score histograms of {2 * SCORE_BINS}")
        total += hist
        variance += float(r.variances.get("score_hist", 0.0))
    events, others = total[:SCORE_BINS].tolist(), total[SCORE_BINS:].tolist()
    held = round(float(total.sum()))
    return auc_from_histograms(events, others), auc_noise_sd(events, others, variance), held
