"""The analysts' quickstart notebook (docs/notebooks/) runs, top to bottom, against a real
federation: real nodes and hub on loopback with mTLS, executed in a real Jupyter kernel.

Federation.connect() in the notebook finds the hub and identity through CHC_HUB and
CHC_IDENTITY, as an analyst's shell would set them; the notebook writes its charts to
CHC_NOTEBOOK_OUT.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from coordinator.local.federation import LocalFederation

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "notebooks" / "analyst-quickstart.ipynb"
# "Pooled estimate, age 40-64: 1,234 adults with COPD (95% CI 1,200 to 1,270)"
POOLED_LINE = re.compile(
    r"Pooled estimate, age (?P<band>\S+): (?P<est>[\d,]+) adults with COPD "
    r"\(95% CI (?P<lo>[\d,]+) to (?P<hi>[\d,]+)\)"
)


def _texts(nb: Any) -> list[str]:
    """Every text a cell printed or displayed (stdout, text/plain and text/html)."""
    out: list[str] = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o["text"])
            data = o.get("data", {})
            out += [data[k] for k in ("text/plain", "text/html") if k in data]
    return out


def test_the_quickstart_notebook_runs_to_a_pooled_estimate_and_charts(
    federation: LocalFederation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHC_HUB", federation.hub_address)
    monkeypatch.setenv("CHC_IDENTITY", str(federation.analyst_identity))
    monkeypatch.setenv("CHC_NOTEBOOK_OUT", str(tmp_path))
    # No user's ~/.chc (a running demo) may be read instead; matplotlib writes its cache here.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
    client = NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    texts = _texts(nb)
    joined = "\n".join(texts)
    assert f"connected to {federation.hub_address}" in joined
    pooled = [m.groupdict() for m in POOLED_LINE.finditer(joined)]
    assert pooled, "the notebook printed no pooled estimate"
    for p in pooled:
        est, lo, hi = (float(p[k].replace(",", "")) for k in ("est", "lo", "hi"))
        assert 0 <= lo <= est <= hi
    # The result's HTML view, with its chart, was displayed.
    assert any('class="chc-result"' in t and 'class="chc-chart"' in t for t in texts)
    svg = tmp_path / "copd-by-age-band.svg"
    png = tmp_path / "copd-pooled.png"
    assert svg.read_text().count('class="bar') >= 2 * len(pooled)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5_000  # a drawn chart, not an empty canvas
    assert (tmp_path / "copd-admission-forest.png").stat().st_size > 5_000
    assert "refused:" in joined
