"""Hostile input at the command line: one `error:` line, a documented exit code, no traceback.

Real files throughout (a spec that is not UTF-8, a FIFO and /dev/zero, a node.toml with a 0xff
byte, a junk ledger, malformed PEMs); the hub address is a closed loopback port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from coordinator import cli as chc_cli
from coordinator.audit import cli as audit_cli
from coordinator.cli import MAX_SPEC_BYTES
from coordinator.local import synth
from node import cli as node_cli
from node.bootstrap import init_node
from protocols import security
from protocols.cli import ChcGroup, DebugOpt, ExitCode

# Two lines of a file no analyst should see echoed: a spec symlinked to it must not show them.
SYSTEM_LINE = "root:$6$saltsalt$hashedpasswordhashedpassword:19000:0:99999:7:::"
PRIVATE_TEXT = "hunter2-correct-horse-battery"
# A certificate PEM whose body is cut short: it parses as PEM framing but not as DER.
BROKEN_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBBQUAMBExDzANBgNVBAMMBnNl\n"
    "-----END CERTIFICATE-----\n"
)


def error_line(run: Result) -> str:
    """The one `error:` line a failed command printed on stderr, checked for tracebacks."""
    assert "Traceback" not in run.output, run.output
    assert run.exception is None or isinstance(run.exception, SystemExit), run.exception
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def chc(*args: str) -> Result:
    return CliRunner().invoke(chc_cli.app, list(args))


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
    security.create_ca(folder)
    security.issue(folder, role=security.Role.ANALYST, name="alice", out_dir=folder / "alice")
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
    security.issue(pki, role=security.Role.NODE, name="nwc", out_dir=config.parent / "identity")
    return config.parent


def copy_node(node_dir: Path, to: Path) -> Path:
    """A copy of the node's folder (node.toml and identity), to break one file of."""
    shutil.copytree(node_dir, to)
    return to / "node.toml"


# ---- rich tracebacks, and the boundary itself ----------------------------------------------


def test_no_typer_app_shows_local_variables_in_tracebacks() -> None:
    """rich's locals would print certificate and key bytes held in local variables."""
    apps = [chc_cli.app, chc_cli.hub_app, chc_cli.pki_app, audit_cli.audit_app, node_cli.app]
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
    """A truncated Parquet export (today an internal error in coordinator/audit.py)."""
    export = tmp_path / "nwc.parquet"
    export.write_bytes(b"PAR1" + b"\x00" * 8 + b"PAR1")
    run = chc("audit", "verify", str(export))
    assert run.exit_code in (ExitCode.USAGE, ExitCode.INTERNAL)
    error_line(run)


# ---- spec files ----------------------------------------------------------------------------


def test_a_spec_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    spec = tmp_path / "query.yaml"
    spec.write_bytes(b"view: persons\nrho: 0.1\ngroup_by: [sex]  # caf\xe9\n")
    run = chc("query", "--spec", str(spec))
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert str(spec) in line
    assert "not UTF-8" in line


def test_a_spec_from_a_fifo_is_read_only_up_to_the_limit(tmp_path: Path) -> None:
    """The reader stops one byte past MAX_SPEC_BYTES: the writer sees the pipe close."""
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    outcome: list[str] = []

    def feed() -> None:
        try:
            with fifo.open("wb", buffering=0) as f:
                for _ in range(4):
                    f.write(b"#" * (MAX_SPEC_BYTES // 2))
            outcome.append("all sent")
        except BrokenPipeError:
            outcome.append("reader stopped")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        run = chc("query", "--spec", str(fifo), "--rho", "0.1")
    finally:
        writer.join(timeout=10)
        if writer.is_alive():  # the command never opened the FIFO: release the writer
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            writer.join(timeout=10)
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert f"--spec {fifo} is larger than 256 KB" in line
    assert outcome == ["reader stopped"]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_spec_from_dev_zero_is_refused_without_reading_it_all() -> None:
    run = chc("query", "--spec", "/dev/zero", "--rho", "0.1")
    assert run.exit_code == ExitCode.USAGE
    assert "--spec /dev/zero is larger than 256 KB" in error_line(run)


def test_a_yaml_alias_bomb_in_a_spec_is_refused_at_once(tmp_path: Path) -> None:
    """It used to hang the CLI and grow to GBs while the error message expanded it."""
    lines = ['a0: &a0 ["x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join([*lines, "view: persons", "rho: 0.1", "group_by: *a9"]) + "\n")
    started = time.perf_counter()
    run = chc("query", "--spec", str(bomb))
    assert time.perf_counter() - started < 5
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert "alias" in line or "anchor" in line, line
    assert len(line) < 500


def test_a_spec_that_cannot_be_read_names_the_flag(tmp_path: Path) -> None:
    run = chc("query", "--spec", str(tmp_path))  # a folder
    assert run.exit_code == ExitCode.USAGE
    assert f"--spec {tmp_path}: cannot read it" in error_line(run)


@pytest.fixture
def system_file(tmp_path: Path) -> Path:
    """Stands in for a readable system file, outside the analyst's project folder."""
    target = tmp_path / "etc" / "shadow-like"
    target.parent.mkdir()
    return target


def spec_link(tmp_path: Path, target: Path, text: str) -> Path:
    target.write_text(text, encoding="utf-8")
    link = tmp_path / "query.yaml"
    link.symlink_to(target)
    return link


def test_unknown_fields_are_quoted_as_short_names_only(tmp_path: Path, system_file: Path) -> None:
    spec = spec_link(tmp_path, system_file, f"view: persons\n{SYSTEM_LINE}: {PRIVATE_TEXT}\n")
    run = chc("query", "--spec", str(spec))
    assert run.exit_code == ExitCode.REFUSED
    line = error_line(run)
    assert f"unknown field(s) '{SYSTEM_LINE[:23]}…'; a query spec has delta, epsilon" in line
    assert PRIVATE_TEXT not in run.output
    assert SYSTEM_LINE not in run.output
    spec.unlink()
    lines = [f"key_{i:02}: {PRIVATE_TEXT}" for i in range(40)]
    spec = spec_link(tmp_path, system_file, "\n".join(lines) + "\n")
    run = chc("query", "--spec", str(spec))
    line = error_line(run)
    assert "unknown field(s) 'key_00', 'key_01', 'key_02', 'key_03', 'key_04' and 35 more" in line
    assert PRIVATE_TEXT not in run.output
    assert len(line) < 400


def test_nested_unknown_fields_and_values_are_not_echoed(tmp_path: Path, system_file: Path) -> None:
    spec = spec_link(
        tmp_path,
        system_file,
        f"view: persons\nrho: 0.1\nmeasures:\n  - {{statistic: count, '{SYSTEM_LINE}': 1}}\n",
    )
    run = chc("query", "--spec", str(spec))
    assert run.exit_code == ExitCode.REFUSED
    line = error_line(run)
    assert "measures[0]: unknown field(s)" in line
    assert SYSTEM_LINE not in run.output
    spec.unlink()
    spec = spec_link(tmp_path, system_file, f"view: '{SYSTEM_LINE}'\nrho: 0.1\n")
    run = chc("query", "--spec", str(spec))
    assert run.exit_code == ExitCode.REFUSED
    line = error_line(run)
    assert "view '…' is not a valid name" in line
    assert SYSTEM_LINE not in run.output
    # A name-like value is what the analyst typed as a name: it is quoted back.
    spec.unlink()
    spec = spec_link(
        tmp_path, system_file, "view: persons\nrho: 0.1\nmeasures: [{statistic: medain}]\n"
    )
    assert "'medain' is not supported" in error_line(chc("query", "--spec", str(spec)))


def test_yaml_errors_say_where_without_quoting_the_line(tmp_path: Path, system_file: Path) -> None:
    spec = spec_link(tmp_path, system_file, f"password: {PRIVATE_TEXT}: x\n")
    run = chc("query", "--spec", str(spec))
    assert run.exit_code == ExitCode.USAGE
    line = error_line(run)
    assert "is not valid YAML or JSON at line 1" in line
    assert PRIVATE_TEXT not in run.output


def test_a_spec_that_is_not_a_mapping_says_what_it_holds(tmp_path: Path) -> None:
    account = "alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash"
    spec = tmp_path / "passwd"
    spec.write_text(f"{account}\n{account}\n", encoding="utf-8")
    run = chc("query", "--spec", str(spec))
    assert run.exit_code == ExitCode.REFUSED
    line = error_line(run)
    assert "holds a str, not a query spec" in line
    assert "alice" not in run.output


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


@pytest.mark.parametrize("broken", [security.CERT_FILE, security.KEY_FILE, security.CA_FILE])
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
    (folder / security.CA_KEY_FILE).write_text(BROKEN_PEM)
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
    cert = config.parent / "identity" / security.CERT_FILE
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
