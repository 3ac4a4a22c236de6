"""protocols.cli.console(): tables fit the terminal they print on, never wrap at 80 in a pipe."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import sys
import termios
from collections.abc import Iterator

import pytest

from protocols import cli


@pytest.fixture
def terminal() -> Iterator[io.TextIOWrapper]:
    """A real pseudo-terminal 150 columns wide, opened for writing."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    stream = os.fdopen(follower, "w")
    try:
        yield stream
    finally:
        stream.close()
        os.close(leader)


def test_a_terminal_gives_its_own_width_even_when_dumb(
    terminal: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("TERM", "dumb")  # rich alone would say 80 here
    # Set here, not in the fixture: pytest's capture puts its own sys.stdout back after setup.
    monkeypatch.setattr(sys, "stdout", terminal)
    assert cli.console().width == 150


def test_output_that_is_not_a_terminal_is_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli.console().width == cli.PIPE_WIDTH > 80


def test_columns_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "123")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli.console().width == 123
