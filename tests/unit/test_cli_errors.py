"""Hostile input at the command line: one `error:` line, a documented exit code, no traceback.

Real files throughout (a node.toml with a 0xff byte, a junk ledger, malformed PEMs); the hub
address is a closed loopback port. Hostile `--spec` files are in test_cli_spec_files.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from coordinator import cli as chc_cli
from coordinator.audit import cli as audit_cli
from coordinator.hub import cli as hub_cli
from coordinator.local import synth
from node import cli as node_cli
from node.bootstrap import init_node
from protocols.cli import ChcGroup, DebugOpt, ExitCode
from protocols.security.pki import CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE, Role, create_ca, issue
from tests.unit._cli_helpers import chc, error_line

# A certificate PEM whose body is cut short: it parses as PEM framing but not as DER.
BROKEN_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBBQUAMBExDzANBgNVBAMMBnNl\n"
    "-----END CERTIFICATE-----\n"
)


def chc_node(*args: str) -> Result:
    return CliRunner().invoke(node_cli.app, list(args))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    create_ca(folder)
    issue(folder, role=Role.ANALYST, name="alice", out_dir=folder / "alice")
    return folder


@pytest.fixture
def hub_args(pki: Path) -> list[str]:
    """--hub at a closed port and a valid analyst identity."""
    return ["--hub", f"127.0.0.1:{closed_port()}", "--identity", str(pki / "alice")]


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Path:
    """A node that `chc-node check` accepts: small synthetic data, node.toml, identity."""
    root = tmp_path_factory.mktemp("node")
    data = root / "data"
    synth.generate_region(synth.region_by_slug("nwc"), 300, data, seed=3)
    config, report = init_node(root / "node", name="nwc", omop=data, pathways=["copd"])
    assert report.ok
    issue(pki, role=Role.NODE, name="nwc", out_dir=config.parent / "identity")
    return config.parent


def copy_node(node_dir: Path, to: Path) -> Path:
    """A copy of the node's folder (node.toml and identity), to break one file of."""
    shutil.copytree(node_dir, to)
    return to / "node.toml"


# ---- rich tracebacks, and the boundary itself ----------------------------------------------


def test_no_typer_app_shows_local_variables_in_tracebacks() -> None:
    """rich's locals would print certificate and key bytes held in local variables."""
    apps = [chc_cli.app, hub_cli.hub_app, hub_cli.pki_app, audit_cli.audit_app, node_cli.app]
    assert [a.pretty_exceptions_show_locals for a in apps] == [False] * len(apps)


probe = typer.Typer(cls=ChcGroup, pretty_exceptions_show_locals=False)


@probe.callback()
def _probe_root(debug: DebugOpt = False) -> None:
    del debug


@probe.command()
def crash() -> None:
    key = BROKEN_PEM  # a local a rich traceback with locals would print
    raise RuntimeError(f"a bug with {len(key)} bytes at hand")


@probe.command()
def other() -> None:
    """A second command, so that the probe is a group as both CLIs are."""


def test_an_unexpected_error_is_one_line_with_a_reference() -> None:
    run = CliRunner().invoke(probe, ["crash"])
    assert run.exit_code == ExitCode.INTERNAL == 70
    line = error_line(run)
    assert "internal error (RuntimeError: a bug with" in line
    assert "ref " in line
    assert "--debug" in line
    assert "BEGIN CERTIFICATE" not in run.output
    again = error_line(CliRunner().invoke(probe, ["crash"]))
    assert again == line  # the same bug, the same reference


def test_debug_prints_the_plain_traceback_without_locals() -> None:
    for run in (
        CliRunner().invoke(probe, ["--debug", "crash"]),
        CliRunner().invoke(probe, ["crash"], env={"CHC_DEBUG": "1"}),
    ):
        assert run.exit_code == ExitCode.INTERNAL
        assert "Traceback (most recent call last)" in run.stderr
        assert run.stderr.rstrip().splitlines()[-1].startswith("error: internal error")
        assert "BEGIN CERTIFICATE" not in run.output
        assert "MIIB" not in run.output


def test_a_malformed_export_never_shows_a_traceback(tmp_path: Path) -> None:
    """A truncated Parquet export (today an internal error in the auditor's tools)."""
    export = tmp_path / "nwc.parquet"
    export.write_bytes(b"PAR1" + b"\x00" * 8 + b"PAR1")
    run = chc("audit", "verify", str(export))
    assert run.exit_code in (ExitCode.USAGE, ExitCode.INTERNAL)
    error_line(run)


# ---- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1", "0", "0.0001", "601"])
def test_deadline_must_be_finite_positive_and_within_the_hubs_maximum(
    value: str, hub_args: list[str]
) -> None:
    run = chc("query", "--view", "persons", "--rho", "0.1", "--deadline", value, *hub_args)
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert "--deadline" in line
    assert "from 0.001 to 600 (the hub's maximum)" in line


@pytest.mark.parametrize(("value", "shown"), [("1e-320", "1e-320"), ("0.5", "0.5"), ("nan", "nan")])
def test_a_delta_out_of_range_is_a_usage_error_naming_the_flag(
    value: str, shown: str, hub_args: list[str]
) -> None:
    # --delta only converts --epsilon to rho (it is never sent), so a bad one is usage (2),
    # checked before anything is signed or asked, and printed as typed.
    run = chc("query", "--view", "persons", "--epsilon", "1", "--delta", value, *hub_args)
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert "--delta must be between 1e-30 and 0.1" in line
    assert line.endswith(f"got {shown}")


def test_sql_nested_too_deeply_is_refused_in_one_line() -> None:
    sql = "SELECT COUNT(*) FROM persons WHERE " + "(" * 45 + "sex = 'F'" + ")" * 45
    run = chc("query", "--sql", sql, "--rho", "0.1")
    assert run.exit_code == ExitCode.REFUSED
    assert "nested too deeply" in error_line(run)


def test_an_unreachable_hub_is_no_answer(hub_args: list[str]) -> None:
    for args in (
        ["query", "--view", "persons", "--rho", "0.1", *hub_args],
        ["nodes", *hub_args],
        ["budget", *hub_args],
    ):
        run = chc(*args)
        assert run.exit_code == ExitCode.NO_ANSWER, args
        assert "cannot reach the hub" in error_line(run)


def test_synth_flags_are_usage_errors(tmp_path: Path) -> None:
    run = chc("synth", "--region", "zz", "--persons", "10", "--out", str(tmp_path))
    assert run.exit_code == ExitCode.USAGE
    assert "--region" in error_line(run)
    run = chc("synth", "--region", "nwc", "--persons", "0", "--out", str(tmp_path))
    assert run.exit_code == ExitCode.USAGE
    assert "--persons" in error_line(run)


# ---- identities ----------------------------------------------------------------------------


@pytest.mark.parametrize("broken", [CERT_FILE, KEY_FILE, CA_FILE])
def test_a_malformed_identity_pem_names_the_file(
    broken: str, pki: Path, tmp_path: Path, hub_args: list[str]
) -> None:
    identity = tmp_path / "alice"
    shutil.copytree(pki / "alice", identity)
    (identity / broken).write_text(BROKEN_PEM)
    args = [a if a != str(pki / "alice") else str(identity) for a in hub_args]
    run = chc("query", "--view", "persons", "--rho", "0.1", *args)
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert str(identity / broken) in line
    assert "chc pki issue" in line
    assert "MIIB" not in run.output  # no certificate bytes
    assert "BEGIN" not in run.output


def test_a_malformed_ca_key_names_the_pki_folder(pki: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    shutil.copytree(pki, folder)
    (folder / CA_KEY_FILE).write_text(BROKEN_PEM)
    run = chc("pki", "issue", str(folder), "--role", "analyst", "--name", "bob")
    assert run.exit_code == ExitCode.USAGE
    assert f"{folder} does not hold a readable CA" in error_line(run)


# ---- the node ------------------------------------------------------------------------------


def test_node_toml_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_bytes(b'name = "nwc"\nomop = "data"\nidentity = "id"\n# \xff\n')
    run = chc_node("check", "--config", str(config))
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert f"node config {config} is not UTF-8 text" in line


def test_check_with_a_ledger_that_is_not_sqlite(node_dir: Path, tmp_path: Path) -> None:
    config = copy_node(node_dir, tmp_path / "node")
    junk = tmp_path / "node" / "junk.sqlite"
    junk.write_bytes(b"not a database, just bytes\n" * 200)
    text = config.read_text(encoding="utf-8")
    config.write_text(f'ledger = "{junk.name}"\n{text}', encoding="utf-8")
    run = chc_node("check", "--config", str(config))
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert f"ledger {junk} is not a SQLite database" in line
    assert f"`ledger =` in {config}" in line


def test_check_with_a_malformed_node_certificate(node_dir: Path, tmp_path: Path) -> None:
    config = copy_node(node_dir, tmp_path / "node")
    cert = config.parent / "identity" / CERT_FILE
    cert.write_text(BROKEN_PEM)
    run = chc_node("check", "--config", str(config))
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert f"{cert} is not a valid certificate" in line
    assert "MIIB" not in run.output


def test_check_still_accepts_a_good_node(node_dir: Path) -> None:
    run = chc_node("check", "--config", str(node_dir / "node.toml"))
    assert run.exit_code == ExitCode.OK, run.output
    assert "will be created" in run.output


# ---- the installed entry points ------------------------------------------------------------


def test_entry_points_print_one_line_and_exit_with_the_code(tmp_path: Path) -> None:
    spec = tmp_path / "query.yaml"
    spec.write_bytes(b"\xff\xfe")
    config = tmp_path / "node.toml"
    config.write_bytes(b"\xff")
    env = {**os.environ, "CHC_DEBUG": ""}
    for module, args, named in (
        ("coordinator", ["query", "--spec", str(spec), "--rho", "0.1"], f"--spec {spec}"),
        ("node", ["check", "--config", str(config)], str(config)),
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert done.returncode == ExitCode.USAGE, done.stderr
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("error: ")
        assert named in lines[0]
