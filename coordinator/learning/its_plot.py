"""The interrupted time series drawn with its fitted segments (PNG or SVG, by the suffix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# A Figure of its own, not pyplot: no global state, no display, no GUI toolkit.
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from coordinator.learning.its import Z95, ItsFit
from coordinator.learning.plot import FORMATS
from queries.errors import ConfigError


def _panel(ax: Axes, f: ItsFit, title: str) -> None:
    s = f.series
    x = np.arange(len(s.months))
    t0 = s.months.index(f.intervention)
    # Error bars: the DP noise alone (the Poisson part is the model's, drawn by the fit).
    ax.errorbar(
        x,
        s.counts,
        yerr=Z95 * np.sqrt(s.noise_variance),
        fmt="o",
        markersize=3,
        color="black",
        ecolor="lightgrey",
        label="DP monthly count (95% noise)",
    )
    ax.plot(x[:t0], f.fitted[:t0], color="tab:blue", label="fitted, before")
    ax.plot(x[t0:], f.fitted[t0:], color="tab:red", label="fitted, after")
    ax.plot(x[t0:], f.counterfactual[t0:], color="tab:blue", linestyle="--", label="no change")
    ax.axvline(t0 - 0.5, color="grey", linestyle=":", linewidth=1.0)
    step = max(1, len(x) // 12)
    ax.set_xticks(x[::step], [s.months[i] for i in x[::step]], rotation=45, fontsize=7)
    ax.set_ylabel("count per month")
    rr = f.rate_ratio
    ax.set_title(
        f"{title}: rate ratio {rr.estimate:.3g} (95% CI {rr.ci_low:.3g} to {rr.ci_high:.3g})",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="best")


def its_plot(fits: list[tuple[str, ItsFit]], path: Path) -> Path:
    """One panel per (title, fit): counts, fitted segments and the counterfactual."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: a time-series plot is written as .png or .svg, by its suffix")
    fig = Figure(figsize=(8.0, 3.4 * len(fits)))
    axes = fig.subplots(len(fits), 1, squeeze=False)
    for ax, (title, f) in zip(axes[:, 0], fits, strict=True):
        _panel(ax, f, title)
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    return path
