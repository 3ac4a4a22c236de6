"""Hostile `--spec FILE`s: one `error:` line, a documented exit code, nothing of the file echoed.

Real files throughout (a spec that is not UTF-8, a FIFO and /dev/zero, a YAML alias bomb, and
symlinks to a stand-in system file whose lines must never come back in an error).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from coordinator.analyst.cli import MAX_SPEC_BYTES
from protocols.cli import ExitCode
from tests.unit._cli_helpers import chc, error_line

# Two lines of a file no analyst should see echoed: a spec symlinked to it must not show them.
SYSTEM_LINE = "root:$6$saltsalt$hashedpasswordhashedpassword:19000:0:99999:7:::"
PRIVATE_TEXT = "hunter2-correct-horse-battery"

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
    assert f"unknown field(s) '{SYSTEM_LINE[:23]}…'; a query spec has " in line
    # Every field a spec may have is listed, optional ones (rows_per_person) too.
    assert "group_by, honest_nodes, measures, pooled_only, rho, rows_per_person" in line
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
