"""bench/secagg_latency.py's command line: defaults, and refusals that say what to give."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.secagg_latency import MAX_NODES, parse_args


def test_defaults_are_4_and_16_nodes_with_the_secure_path() -> None:
    """With no arguments: 4 and 16 nodes, 30 repeats, the secure path on, SQLite ledgers."""
    args = parse_args([])
    assert args.nodes == [4, 16]
    assert args.repeats == 30
    assert args.persons == 300
    assert args.ordinary_only is False
    assert args.memory_ledger is False
    assert args.workdir is None


def test_options_are_read() -> None:
    """Every option given is what the benchmark gets."""
    args = parse_args(
        [
            "--nodes",
            "2, 8,16",
            "--repeats",
            "5",
            "--persons",
            "50",
            "--deadline-s",
            "7.5",
            "--memory-ledger",
            "--ordinary-only",
            "--workdir",
            "work/bench",
        ]
    )
    assert args.nodes == [2, 8, 16]
    assert (args.repeats, args.persons, args.deadline_s) == (5, 50, 7.5)
    assert args.memory_ledger
    assert args.ordinary_only
    assert args.workdir == Path("work/bench")


@pytest.mark.parametrize("nodes", ["1", "4,1", "abc", "", f"{MAX_NODES + 1}"])
def test_node_counts_a_secure_round_cannot_have_are_refused(
    nodes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One node (its masked vector would be its own value), none, or too many: refused."""
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--nodes", nodes])
    assert stopped.value.code == 2
    assert "at least 2 nodes" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--repeats", "0"), ("--persons", "x")])
def test_counts_must_be_positive_whole_numbers(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zero repeats or a word for persons is refused, naming what to give."""
    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert "whole number of at least 1" in capsys.readouterr().err


def test_deadline_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    """A zero deadline would fail every query: refused before anything starts."""
    with pytest.raises(SystemExit):
        parse_args(["--deadline-s", "0"])
    assert "--deadline-s must be positive" in capsys.readouterr().err
