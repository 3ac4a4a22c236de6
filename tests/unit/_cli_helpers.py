"""Running the `chc` app in-process and reading its one `error:` line, for the CLI error tests.

Shared by test_cli_errors.py and test_cli_spec_files.py, which both check that hostile input
ends in a single line on stderr and a documented exit code, never a traceback.
"""

from __future__ import annotations

from click.testing import Result
from typer.testing import CliRunner

from coordinator import cli as chc_cli


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
