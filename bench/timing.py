"""Shared timing helpers for the benchmark scripts (run them as `python -m bench.NAME`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timings(fn: Callable[[], object], repeats: int, *, warmup: bool = True) -> list[float]:
    """Wall-clock milliseconds of `repeats` calls, after one untimed warm-up call."""
    if warmup:
        fn()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile by nearest rank."""
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def summary(xs: list[float], digits: int = 3) -> dict[str, float]:
    """p50, p95, p99 and mean, in milliseconds."""
    return {
        "p50_ms": round(statistics.median(xs), digits),
        "p95_ms": round(percentile(xs, 95), digits),
        "p99_ms": round(percentile(xs, 99), digits),
        "mean_ms": round(statistics.fmean(xs), digits),
    }
