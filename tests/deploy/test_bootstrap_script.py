"""deploy/compose/bootstrap.sh with shellcheck (Debian's, `make deploy-tools`), as POSIX sh.

The script runs under the images' /bin/sh (Debian's dash), so it is checked as `sh`, not
bash. tests/deploy/test_entrypoints.py runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy import _containers as c

SHELLCHECK = shutil.which("shellcheck")
SCRIPT = c.COMPOSE_DIR / "bootstrap.sh"


def _shellcheck(path: str) -> subprocess.CompletedProcess[str]:
    if SHELLCHECK is None:
        # CI installs it (make deploy-tools): there, its absence is a failure.
        assert not os.environ.get("CI"), "shellcheck is missing: run make deploy-tools"
        pytest.skip("shellcheck is not installed (make deploy-tools: Debian package shellcheck)")
    return subprocess.run(
        [SHELLCHECK, "--shell=sh", "--severity=style", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_bootstrap_script_passes_shellcheck() -> None:
    result = _shellcheck(str(SCRIPT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_an_unquoted_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text(SCRIPT.read_text().replace('mkdir -p "$FED/crl"', "mkdir -p $FED/crl"))
    assert "SC2086" in _shellcheck(str(bad)).stdout
