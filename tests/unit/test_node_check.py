"""`chc-node check` says "ready" only after every check passed, the ledger's included.

Issue 10, item 5: with `ledger =` naming a file that is not SQLite, `check` printed "node ... is
ready" and then failed on the ledger. Real files throughout: synthetic OMOP data, a real
certificate, a real SQLite ledger opened by the node's own accountant.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.local import synth
from node import cli as node_cli
from node.bootstrap import init_node
from node.budget.accounting import default_ledger_path, open_accountant
from node.config import load_config
from protocols.cli import ExitCode
from protocols.security.pki import Role, create_ca, issue
from tests.unit._cli_helpers import error_line

READY = re.compile(r"^node nwc \(node certificate nwc\) is ready: views built in ", re.M)


def chc_node(*args: str) -> Result:
    return CliRunner().invoke(node_cli.app, list(args))


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node that `chc-node check` accepts, with no ledger yet."""
    root = tmp_path_factory.mktemp("node")
    pki = root / "pki"
    create_ca(pki)
    data = root / "data"
    synth.generate_region(synth.region_by_slug("nwc"), 300, data, seed=3)
    config, report = init_node(root / "node", name="nwc", omop=data, pathways=["copd"])
    assert report.ok
    issue(pki, role=Role.NODE, name="nwc", out_dir=config.parent / "identity")
    return config.parent


@pytest.fixture
def config(node_dir: Path, tmp_path: Path) -> Path:
    """node.toml in a private copy of the node's folder, free to break."""
    shutil.copytree(node_dir, tmp_path / "node")
    return tmp_path / "node" / "node.toml"


def start_ledger(config: Path) -> Path:
    """The ledger `serve` would create (its policy entry recorded), closed again."""
    cfg = load_config(config)
    open_accountant(cfg, config_file=config).close()
    path = default_ledger_path(cfg, config)
    assert path.is_file()
    return path


def test_a_ledger_that_is_not_sqlite_fails_before_ready_is_printed(config: Path) -> None:
    junk = config.parent / "junk.sqlite"
    junk.write_bytes(b"not a database, just bytes\n" * 200)
    config.write_text(f'ledger = "{junk.name}"\n{config.read_text("utf-8")}', "utf-8")
    run = chc_node("check", "--config", str(config))
    assert run.exit_code == ExitCode.USAGE
    assert f"ledger {junk} is not a SQLite database" in error_line(run)
    assert "view " in run.stdout  # the data checks ran and passed first
    assert "is ready" not in run.output


def test_a_loosened_budget_fails_before_ready_is_printed(config: Path) -> None:
    start_ledger(config)
    text = config.read_text("utf-8")
    assert "total_rho = 10.0" in text
    config.write_text(text.replace("total_rho = 10.0", "total_rho = 20.0"), "utf-8")
    run = chc_node("check", "--config", str(config))
    assert run.exit_code == ExitCode.USAGE, run.output
    assert "loosens the budget policy recorded in its ledger" in error_line(run)
    assert "is ready" not in run.output


def test_a_good_node_without_a_ledger_says_ready_last(config: Path) -> None:
    run = chc_node("check", "--config", str(config))
    assert run.exit_code == ExitCode.OK, run.output
    lines = run.stdout.strip().splitlines()
    assert READY.match(lines[-1]), lines[-1]
    assert "will be created, with its signing key, at first start" in lines[-2]


def test_a_good_node_with_its_ledger_says_ready_after_the_ledger(config: Path) -> None:
    ledger = start_ledger(config)
    run = chc_node("check", "--config", str(config))
    assert run.exit_code == ExitCode.OK, run.output
    lines = run.stdout.strip().splitlines()
    assert READY.match(lines[-1]), lines[-1]
    assert lines[-2] == (
        f"ledger {ledger}: ok, rho 0 of 10 spent this period, 0 of 50 over the node's life"
    )
