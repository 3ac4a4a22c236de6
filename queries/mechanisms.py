"""Noise and accounting: the only module that imports OpenDP.

Privacy accounting is in zero-concentrated DP (rho). Facts used, with their sources:
- The discrete Gaussian with scale sigma on an integer query of L2 sensitivity D satisfies
  rho = D^2 / (2 sigma^2)-zCDP (Canonne, Kamath & Steinke 2020), and its variance is at most
  sigma^2 (same paper, Proposition 19), so sigma^2 is a safe variance for intervals.
- rho-zCDP implies (eps, delta)-DP with eps = rho + 2 sqrt(rho ln(1/delta)) (Bun & Steinke 2016).
Sensitivities themselves are computed in queries/sensitivity.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import opendp.prelude as dp

dp.enable_features("contrib")

MECHANISM = "discrete_gaussian"
# OpenDP's atom_domain(T=int) is i32: exact values from 2^31 on would raise after the charge.
# Every release is on i64, and plan time refuses whatever could leave this range.
INTEGER_TYPE = "i64"
INT64_MAX = 2**63 - 1
# OpenDP adds integer noise with saturating arithmetic, so a value near the end of the range
# would be clipped silently. Plans keep |exact| + NOISE_TAIL_SIGMAS * sigma inside the range:
# a discrete Gaussian exceeds 40 sigma with probability below exp(-800).
NOISE_TAIL_SIGMAS = 40.0
# OpenDP rounds privacy maps up; widening sigma by this factor keeps the charge within the
# rho the analyst asked for, at a cost in noise of one part in a billion.
_SCALE_SLACK = 1.0 + 1e-9


def scale_for_rho(rho: float, sensitivity: float) -> float:
    """Discrete Gaussian scale sigma that spends exactly rho on a query of this sensitivity."""
    if rho <= 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be positive and finite, got {rho}")
    return sensitivity / math.sqrt(2.0 * rho) * _SCALE_SLACK


def fits_int64(max_abs_exact: float, scale: float) -> bool:
    """True if exact values up to max_abs_exact plus any plausible noise stay within i64."""
    reach = max_abs_exact + NOISE_TAIL_SIGMAS * scale
    return math.isfinite(reach) and reach < INT64_MAX / 2


def rho_to_epsilon(rho: float, delta: float) -> float:
    """The (epsilon, delta)-DP guarantee implied by rho-zCDP (Bun & Steinke 2016, Prop. 1.3)."""
    if rho == 0:
        return 0.0
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


@dataclass(frozen=True)
class Calibration:
    """A discrete Gaussian fixed before any data is touched: its scale and certified cost."""

    scale: float
    sensitivity: float
    rho: float  # what OpenDP's privacy map certifies; the amount the node charges

    @property
    def variance(self) -> float:
        """An upper bound on each released value's noise variance (sigma^2)."""
        return self.scale**2


def _d_in(sensitivity: float) -> int | float:
    # OpenDP's integer l2 metric takes an integer distance when the bound is whole.
    return int(sensitivity) if float(sensitivity).is_integer() else sensitivity


# Building a measurement costs ~0.5 ms of FFI; analysts repeat the same rho, so keep a few.
@functools.lru_cache(maxsize=256)
def _measurement(scale: float, sensitivity: float) -> dp.Measurement:
    if float(sensitivity).is_integer():
        space = (
            dp.vector_domain(dp.atom_domain(T=INTEGER_TYPE)),
            dp.l2_distance(T=INTEGER_TYPE),
        )
        return dp.m.make_gaussian(*space, scale=scale)
    # A sensitivity of c * sqrt(m) is not whole, so use OpenDP's float-valued L2 metric over
    # the same integer domain; the noise is still the discrete Gaussian.
    space_f = (dp.vector_domain(dp.atom_domain(T=INTEGER_TYPE)), dp.l2_distance(T=float))
    return dp.m.make_gaussian(*space_f, scale=scale)


def calibrate(sensitivity: float, rho: float) -> Calibration:
    """The discrete Gaussian that spends at most rho on a query of this L2 sensitivity."""
    scale = scale_for_rho(rho, sensitivity)
    charged = float(_measurement(scale, sensitivity).map(_d_in(sensitivity)))  # type: ignore[no-untyped-call]
    if charged > rho * (1 + 1e-6):
        # Never spend more than was asked for; this would be a bug in our calibration.
        raise RuntimeError(f"calibration error: OpenDP charges {charged} for rho {rho}")
    return Calibration(scale=scale, sensitivity=float(sensitivity), rho=charged)


def add_noise(calibration: Calibration, exact: Sequence[int]) -> tuple[int, ...]:
    """Release exact integers with the calibrated discrete Gaussian noise (OpenDP).

    One OpenDP call draws the whole vector; its time is about 8 us per value on the benchmark
    machine (the exact sampler), far more than the conversions around it.
    """
    if len(exact) == 0:
        return ()
    meas = _measurement(calibration.scale, calibration.sensitivity)
    noisy: list[int] = meas([int(v) for v in exact])
    # OpenDP saturates at either end of the i64 range; the array holds every value, as i64.
    values = np.asarray(noisy, dtype=np.int64)
    if bool(((values >= INT64_MAX) | (values <= -INT64_MAX)).any()):
        # Plans rule this out (fits_int64); a saturated value must never pass as a release.
        raise ArithmeticError("a noisy value saturated the 64-bit range")
    return tuple(values.tolist())
