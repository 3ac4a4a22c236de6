"""Distributed discrete Gaussian noise: each node adds a share, the honest shares' sum protects.

With secure aggregation (protocols/secagg) the hub sees only the sum of the nodes' noisy
vectors, so the noise need not be full-size at every node: each of k nodes adds a discrete
Gaussian share of scale sigma, sized so that the sum of any t honest shares alone already
gives the target rho; the other k - t shares are then independent noise on top
(post-processing), and the pooled noise has variance k sigma^2 instead of per-node noise's k
times the central variance.

A sum of discrete Gaussians is not exactly a discrete Gaussian. The accounting is that of
Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation" (ICML 2021, where it is Theorem 5; arXiv:2102.06387v1,
Proposition 14 / Eq. 17, the Renyi-DP bound behind its Theorem 1; numbering moves between
versions): for n independent shares N_Z(0, sigma^2) added to a
d-dimensional integer query of L2 sensitivity D, with

    tau = 10 * sum_{j=1}^{n-1} exp(-2 pi^2 sigma^2 j / (j + 1))   and   s = D / (sqrt(n) sigma),

the Renyi divergence of order alpha > 1 is at most min(alpha s^2 / 2 + tau d,
alpha (s + sqrt(d) tau)^2 / 2). Both bounds are at most alpha * rho (zCDP, Bun and Steinke
2016) for

    rho_n(sigma) = min(s^2 / 2 + tau d, (s + sqrt(d) tau)^2 / 2)

(the first because alpha > 1 makes tau d <= alpha tau d). This is the authors' own
accounting (google-research/federated, distributed_dp/accounting_utils.py: the same tau and
s, the same two terms) less their third term, alpha/2 (s^2 + 2 s_1 tau + tau^2 d) with the
L1 scale s_1, which we leave out: that only loosens the bound, never weakens the guarantee.
rho_n decreases in sigma, so the share scale is the smallest sigma with rho_t(sigma) <= the
target, found by bisection and rounded up. For n = 1 the sum is one discrete Gaussian and
rho_1 = D^2 / (2 sigma^2), exactly Canonne, Kamath and Steinke 2020 (mechanisms.py). The share
scale is never below 1/2, the range KLS21's sum theorem is stated for; a floor only ever adds
noise.

The penalty tau is negligible once shares are a few units wide (at sigma = 4 each term is
below e^-150) but not for small shares: a count at rho = 0.1 over 16 nodes would have shares
of scale 0.56 without the penalty; the penalty forces 0.72, a pooled noise 28% wider than
central DP's. KLS21 avoid
this regime by scaling the data up before noising (their granularity gamma). So do we: the
node multiplies its exact integers by a public power of ten (`upscale`, chosen so that the
ideal share scale is at least 4 units of the scaled query; 1 when there is one share), the
sensitivity scales with it, and the hub divides the decoded sum by it. Scaling is a public,
data-independent map, so the guarantee is the scaled query's; the released sum is then a
multiple of 1/upscale.

The noise itself is OpenDP's discrete Gaussian, drawn through mechanisms.add_noise (the only
OpenDP import); nothing here draws random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from queries import mechanisms
from queries.errors import QueryError
from queries.spec import RHO_RANGE

# Shares are summed in Z_2^64 and decoded as two's complement (protocols/secagg/ring.py):
# exact whenever the true sum lies in [-2^63, 2^63). Half of that, as mechanisms.fits_int64
# keeps, leaves room for the float rounding of the bound itself.
RING_BITS = 64
RING_HALF = 2 ** (RING_BITS - 1)
# KLS21 state their sum-of-discrete-Gaussians bound for share scales of at least 1/2.
MIN_SHARE_SCALE = 0.5
# Smallest ideal share scale, in scaled units, for which tau is negligible (see above).
MIN_IDEAL_SHARE_SCALE = 4.0
MAX_UPSCALE = 10**6
# Bisection stops when the bracket is this narrow relative to sigma; the upper end is used.
_RELATIVE_TOLERANCE = 1e-12


def kls_tau(share_scale: float, shares: int) -> float:
    """KLS21's penalty for summing `shares` discrete Gaussians of scale share_scale.

    tau = 10 * sum_{j=1}^{shares-1} exp(-2 pi^2 sigma^2 j / (j+1)); zero for one share.
    """
    s2 = share_scale * share_scale
    return 10.0 * math.fsum(
        math.exp(-2.0 * math.pi**2 * s2 * j / (j + 1)) for j in range(1, shares)
    )


def sum_rho(share_scale: float, sensitivity: float, shares: int, dimension: int) -> float:
    """The zCDP rho of the sum of `shares` honest shares on a d-dimensional query (KLS21).

    rho = min(s^2/2 + tau d, (s + sqrt(d) tau)^2 / 2) with s = D / (sqrt(shares) sigma), from
    KLS21 Proposition 14 (see the module docstring); exactly D^2 / (2 sigma^2) for one share.
    """
    if shares < 1 or dimension < 1:
        raise ValueError(f"shares and dimension must be at least 1, got {shares}, {dimension}")
    s = sensitivity / (math.sqrt(shares) * share_scale)
    tau = kls_tau(share_scale, shares)
    return min(s * s / 2.0 + tau * dimension, (s + math.sqrt(dimension) * tau) ** 2 / 2.0)


def _solve_scale(sensitivity: float, rho: float, threshold: int, dimension: int) -> float:
    """The smallest share scale (to 1e-12 relative, rounded up) with sum_rho <= rho."""

    def ok(sigma: float) -> bool:
        return sum_rho(sigma, sensitivity, threshold, dimension) <= rho

    # Without the penalty the answer would be the central scale over sqrt(t): start there.
    low = max(MIN_SHARE_SCALE, sensitivity / math.sqrt(2.0 * rho * threshold))
    if ok(low):
        return low
    high = 2.0 * low
    while not ok(high):
        low, high = high, 2.0 * high
    while (high - low) > _RELATIVE_TOLERANCE * high:
        middle = (low + high) / 2.0
        if ok(middle):
            high = middle
        else:
            low = middle
    return high


def ring_fits(max_abs_per_node: float, nodes: int, share_scale: float) -> bool:
    """True if k nodes' values, each up to max_abs_per_node, plus their shares cannot wrap.

    Each share stays within mechanisms.NOISE_TAIL_SIGMAS (40) share scales but with
    probability below exp(-800), so the sum stays within k (bound + 40 sigma); that must fit
    half the signed 64-bit range.
    """
    reach = nodes * (max_abs_per_node + mechanisms.NOISE_TAIL_SIGMAS * share_scale)
    return math.isfinite(reach) and reach < RING_HALF / 2


@dataclass(frozen=True)
class DistributedCalibration:
    """One node's share of distributed discrete Gaussian noise, fixed before data is touched.

    Ring units are the component's own integer units times `upscale`: nodes add their shares
    in ring units, and the hub divides the decoded sum by upscale. share is the OpenDP
    calibration each node draws its share with, in ring units (its rho is what the share alone
    would give: the guarantee if the node were the only honest one). The guarantees are for
    the released sum: rho_threshold if only `threshold` nodes are honest (at most target_rho,
    which is what each node charges), rho_all_honest if all `nodes` are.
    """

    sensitivity: float  # L2, in the component's units
    dimension: int
    nodes: int
    threshold: int
    upscale: int
    target_rho: float
    rho_threshold: float
    rho_all_honest: float
    share: mechanisms.Calibration

    @property
    def share_scale(self) -> float:
        """Each node's discrete Gaussian scale sigma, in ring units."""
        return self.share.scale

    @property
    def share_variance(self) -> float:
        """An upper bound on one share's variance, in ring units (sigma^2; CKS20, Prop. 19)."""
        return self.share.variance

    @property
    def pooled_variance(self) -> float:
        """An upper bound on the released sum's noise variance, in the component's units.

        k * share variance / upscale^2 (k * share variance when upscale is 1).
        """
        return self.nodes * self.share_variance / self.upscale**2


def _check_arguments(
    sensitivity: float, rho: float, nodes: int, threshold: int, dimension: int
) -> None:
    if nodes < 1:
        raise QueryError(f"nodes must be at least 1, got {nodes}")
    if not 1 <= threshold <= nodes:
        raise QueryError(
            f"threshold t = {threshold} must be between 1 and the number of nodes k = {nodes}: "
            "it is how many of the k nodes are assumed honest"
        )
    if dimension < 1:
        raise QueryError(f"dimension must be at least 1 (the vector's length), got {dimension}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise QueryError(f"sensitivity must be positive and finite, got {sensitivity}")
    if not (math.isfinite(rho) and 0 < rho <= RHO_RANGE[1]):
        raise QueryError(
            f"rho must be positive, finite and at most {RHO_RANGE[1]:g}, got {rho}; "
            "give the query a smaller rho"
        )


def choose_upscale(sensitivity: float, rho: float, threshold: int) -> int:
    """The smallest power of ten that makes the ideal share scale at least 4 ring units.

    1 when there is one share (no sum, no penalty) or the shares are already wide.
    """
    upscale = 1
    while threshold > 1 and upscale < MAX_UPSCALE:
        if upscale * sensitivity / math.sqrt(2.0 * rho * threshold) >= MIN_IDEAL_SHARE_SCALE:
            break
        upscale *= 10
    return upscale


def calibrate_distributed(
    sensitivity: float,
    rho: float,
    nodes: int,
    threshold: int,
    *,
    dimension: int = 1,
    max_abs_per_node: float | None = None,
    upscale: int | None = None,
) -> DistributedCalibration:
    """The share scale for k nodes so that any t honest shares alone give zCDP at rho.

    sensitivity is the L2 sensitivity of the whole d-dimensional component vector (in its
    integer units), dimension its length d (KLS21's penalty grows with d). max_abs_per_node,
    when given, is the public bound on one node's |exact value| per cell, in the same units:
    the sum of k of them, scaled, plus noise must fit the 64-bit ring, else the query is
    refused. upscale None chooses it (choose_upscale); 1 turns scaling off.
    """
    _check_arguments(sensitivity, rho, nodes, threshold, dimension)
    if upscale is None:
        upscale = choose_upscale(sensitivity, rho, threshold)
    if not 1 <= upscale <= MAX_UPSCALE:
        raise QueryError(f"upscale must be between 1 and {MAX_UPSCALE}, got {upscale}")
    scaled = sensitivity * upscale
    sigma = _solve_scale(scaled, rho, threshold, dimension)
    # OpenDP certifies the single share at the scale it will draw with (rounded up by
    # mechanisms' slack); the sum's guarantees are recomputed at that same scale.
    share = mechanisms.calibrate(scaled, scaled**2 / (2.0 * sigma * sigma))
    scale = share.scale
    rho_t = sum_rho(scale, scaled, threshold, dimension)
    if rho_t > rho:
        raise RuntimeError(f"calibration error: the sum of t shares spends {rho_t} > {rho}")
    # With all k honest, any t of them suffice, and so may all k together (the others' shares
    # are independent noise on top): the better of the two.
    rho_k = min(rho_t, sum_rho(scale, scaled, nodes, dimension))
    if max_abs_per_node is not None and not ring_fits(max_abs_per_node * upscale, nodes, scale):
        raise QueryError(
            f"the sum of {nodes} nodes' values up to {max_abs_per_node:.3g} units (times "
            f"{upscale}) plus noise (share sigma {scale:.3g}) could overflow the 64-bit ring of "
            "secure aggregation; give the measure narrower CLAMP bounds or query fewer nodes"
        )
    return DistributedCalibration(
        sensitivity=float(sensitivity),
        dimension=dimension,
        nodes=nodes,
        threshold=threshold,
        upscale=upscale,
        target_rho=rho,
        rho_threshold=rho_t,
        rho_all_honest=rho_k,
        share=share,
    )


def add_share(calibration: DistributedCalibration, exact: Sequence[int]) -> tuple[int, ...]:
    """This node's exact integers, scaled to ring units, plus its share drawn by OpenDP.

    One OpenDP call per vector. The result is what the node masks (protocols/secagg/masks.py).
    """
    if len(exact) != calibration.dimension:
        raise QueryError(
            f"the vector has {len(exact)} values but the calibration is for "
            f"{calibration.dimension}; calibrate for the vector's length"
        )
    return mechanisms.add_noise(calibration.share, [int(v) * calibration.upscale for v in exact])


def released_sum(calibration: DistributedCalibration, ring_sum: Sequence[int]) -> list[float]:
    """The decoded sum of every node's shares back in the component's units (/ upscale)."""
    return [v / calibration.upscale for v in ring_sum]
