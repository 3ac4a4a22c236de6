"""Running `chc demo --keep-running` in a test: wait until its federation is up."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest


def wait_for_state(proc: subprocess.Popen[str], state: Path, timeout_s: float) -> dict[str, str]:
    """The demo's state file (hub address, analyst identity) once it is written."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state.is_file():
            text = state.read_text()
            if text:
                data: dict[str, str] = json.loads(text)
                return data
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"chc demo exited with {proc.returncode}:\n{err}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("chc demo did not start within the timeout")
