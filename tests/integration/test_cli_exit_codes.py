"""Exit codes against a real federation: a command whose answer is no answer never exits 0.

Two small nodes and a hub on loopback. The last test stops both nodes, so it runs last.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols.cli import ExitCode

pytestmark = pytest.mark.integration

REGIONS = ("nenc", "nwc")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("exit-codes")
    setups = []
    for slug in REGIONS:
        folder = root / "data" / slug
        synth.generate_region(synth.region_by_slug(slug), 1_000, folder, seed=5)
        setups.append(NodeSetup(name=slug, omop=folder))
    with LocalFederation(workdir=root, nodes=tuple(setups), deadline_ms=5_000) as federation:
        yield federation


def chc(fed: LocalFederation, *args: str) -> Result:
    hub = ["--hub", fed.hub_address, "--identity", str(fed.analyst_identity)]
    return CliRunner().invoke(app, [*args, *hub])


def error_line(run: Result) -> str:
    """The one `error:` line of a failed command (after its normal output, if any)."""
    assert "Traceback" not in run.output, run.output
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def test_an_answered_query_exits_0(fed: LocalFederation, tmp_path: Path) -> None:
    spec = tmp_path / "query.yaml"
    spec.write_text("view: persons\nrho: 0.01\ngroup_by: [sex]\n", encoding="utf-8")
    run = chc(fed, "query", "--spec", str(spec), "--json")
    assert run.exit_code == ExitCode.OK, run.output
    assert run.stderr == ""


def test_a_query_every_node_refuses_exits_3(fed: LocalFederation) -> None:
    run = chc(fed, "query", "--view", "persns", "--rho", "0.01")
    assert run.exit_code == ExitCode.REFUSED
    assert "every node refused the query" in error_line(run)


def test_an_explain_every_node_refuses_exits_3(fed: LocalFederation) -> None:
    run = chc(fed, "query", "--view", "persns", "--rho", "0.01", "--explain")
    assert run.exit_code == ExitCode.REFUSED
    line = error_line(run)
    assert "every node refused the query" in line
    assert "persns" in line  # the nodes' reason: no such view
    assert all(f"{n}: refused" in run.stdout for n in REGIONS)  # each node's status first


def test_a_deadline_every_node_misses_exits_4(fed: LocalFederation) -> None:
    run = chc(fed, "query", "--view", "persons", "--rho", "0.01", "--deadline", "0.001", "--json")
    assert run.exit_code == ExitCode.NO_ANSWER
    line = error_line(run)
    assert line.startswith("error: no node answered (")
    assert all(f"{n} timed_out" in line for n in REGIONS)
    assert '"partial": true' in run.stdout  # the JSON is still printed for programs


def test_no_node_running_exits_4_for_every_command(fed: LocalFederation) -> None:
    for name in REGIONS:
        fed.stop_process(name)
    for args in (
        ["query", "--view", "persons", "--rho", "0.01"],
        ["query", "--view", "persons", "--rho", "0.01", "--explain"],
        ["nodes"],
        ["budget"],
    ):
        run = chc(fed, *args)
        assert run.exit_code == ExitCode.NO_ANSWER, (args, run.output)
        line = error_line(run)
        assert line.startswith("error: no node answered ("), line
        assert all(f"{n} unreachable" in line for n in REGIONS), line
