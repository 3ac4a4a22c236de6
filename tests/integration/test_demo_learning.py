"""`chc demo --learning` end to end: the care-site comparison, the ITS with DiD, four figures.

Real processes, as a newcomer runs it. At 2,000,000 persons (the --learning default) every
month of the three ITS regions is released under the demo nodes' default rules (seed 2015:
the smallest exact monthly count is 19 against a threshold of 8 and a noise sd of about 1.4,
demo_learning.LEARNING_PERSONS); fewer persons make the ITS refuse a month. Each run takes
about 30 s on 2 cores, so the printed run and the --json run are each made once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.local import synth

pytestmark = pytest.mark.integration

PERSONS = 2_000_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = (
    "funnel-care-sites.png",
    "funnel-care-sites.svg",
    f"its-{synth.INTERVENTION.pathway}-{synth.INTERVENTION.region}.png",
    f"its-{synth.INTERVENTION.pathway}-{synth.INTERVENTION.region}.svg",
)


def _demo(figures: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["demo", "--learning", "--figures", str(figures), "--persons", str(PERSONS)]
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args, *extra],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The figures folder and stdout of one `chc demo --learning` run."""
    figures = tmp_path_factory.mktemp("printed") / "figures"
    run = _demo(figures)
    assert run.returncode == 0, run.stderr
    return figures, run.stdout


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON of one `chc demo --learning --json` run."""
    run = _demo(tmp_path_factory.mktemp("json") / "figures", "--json")
    assert run.returncode == 0, run.stderr
    data: dict[str, Any] = json.loads(run.stdout)
    return data


def test_the_four_figures_are_written(printed: tuple[Path, str]) -> None:
    figures, _ = printed
    for name in NAMES:
        path = figures / name
        assert path.is_file(), path
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
            assert path.stat().st_size > 5_000
        else:
            assert ElementTree.parse(path).getroot().tag.endswith("svg")  # noqa: S314 - ours


def test_the_report_shows_both_analyses_and_where_the_figures_are(
    printed: tuple[Path, str],
) -> None:
    figures, out = printed
    for name in NAMES:
        assert str((figures / name).resolve()) in out
    assert "care_site  observed  expected" in out  # the comparison's table header
    assert f"{synth.WORSE_TRUST} is the synthetic data's deliberately worse trust" in out
    assert "difference-in-differences rate ratio" in out
    assert "parallel-trends check" in out
    # The pathway report comes first, as in `chc demo`.
    assert out.index("Adults with COPD") < out.index("care_site  observed")


def test_json_carries_the_comparison_the_its_and_the_figures(payload: dict[str, Any]) -> None:
    assert set(payload["regions"]) == {r.slug for r in synth.REGIONS}
    learning = payload["learning"]
    comparison = learning["comparison"]
    assert comparison["by"] == "care_site"
    units = {u["unit"] for u in comparison["units"]}
    assert {t.code for t in synth.TRUSTS} <= units  # every region declares its trusts
    assert set(comparison["outliers"]) <= units
    its = learning["its"]
    assert its["control"]["series"] == "nenc+yh"
    assert its["did_rate_ratio"]["ci_low"] < its["did_rate_ratio"]["ci_high"]
    assert [Path(p).name for p in learning["figures"]] == list(NAMES)
    assert all(Path(p).is_file() for p in learning["figures"])


def test_learning_on_custom_nodes_is_refused_before_anything_starts(tmp_path: Path) -> None:
    figures = tmp_path / "figures"
    run = CliRunner().invoke(
        app,
        ["demo", "--learning", "--node", f"mine={tmp_path}", "--figures", str(figures)],
    )
    assert run.exit_code == 2, run.output
    assert "--learning runs on the synthetic regions only" in run.output
    assert "Generating synthetic" not in run.output
    assert not figures.exists()
