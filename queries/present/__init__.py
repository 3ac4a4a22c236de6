"""Presenting federated results to people and programs: frames, SVG charts and HTML.

Pure functions of a FederatedResult or an Explanation (queries/results.py), used by the
results' own methods (to_arrow, to_pandas, to_polars, _repr_html_) and by the web UI.
pandas and polars are imported only when a frame of theirs is asked for.
"""

from __future__ import annotations

from queries.present.chart import result_chart_svg
from queries.present.frames import (
    MissingExtraError,
    explanation_arrow,
    result_arrow,
    to_pandas,
    to_polars,
)
from queries.present.html import explanation_html, result_html
from queries.present.secure import NoiseComparison, compare_noise, guarantee_text

__all__ = [
    "MissingExtraError",
    "NoiseComparison",
    "compare_noise",
    "explanation_arrow",
    "explanation_html",
    "guarantee_text",
    "result_arrow",
    "result_chart_svg",
    "result_html",
    "to_pandas",
    "to_polars",
]
