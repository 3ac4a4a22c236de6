"""deploy/systemd/: `systemd-analyze verify` and `security`, and the hardening promised.

systemd-analyze (Debian's systemd, /usr/bin/systemd-analyze) checks the unit files
offline: unknown directives, bad values and a missing executable. The units name
/opt/chc/venv/bin, where a custodian installs chc; the test verifies copies that name this
venv's executables instead, so the executables' check is real. verify prints problems but
exits 0 for most of them, so any output fails the test. The units' ExecStart lines are run
in tests/deploy/test_entrypoints.py.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy import _containers as c

UNITS = c.REPO / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
# CI installs it (make deploy-tools), so there its absence fails rather than skips.
needs_analyze = pytest.mark.skipif(
    ANALYZE is None and not os.environ.get("CI"),
    reason="systemd-analyze is not installed (make deploy-tools: Debian package systemd)",
)
# systemd-analyze security's exposure scale is 0-10 (--threshold takes tenths): 2.0 is
# the top of its "OK" band.
EXPOSURE_THRESHOLD = 20


def _copy(unit: str, folder: Path, text: str | None = None) -> Path:
    text = (UNITS / unit).read_text(encoding="utf-8") if text is None else text
    path = folder / unit
    path.write_text(text.replace("/opt/chc/venv/bin/", f"{c.VENV_BIN}/"), encoding="utf-8")
    return path


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _service(unit: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / unit)
    return parser["Service"]


@needs_analyze
def test_the_units_verify_cleanly(tmp_path: Path) -> None:
    units = [_copy(u, tmp_path) for u in ("chc-node.service", "chc-hub.service")]
    result = _verify(*units)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_verify_catches_a_misspelt_directive(tmp_path: Path) -> None:
    text = (UNITS / "chc-node.service").read_text(encoding="utf-8")
    bad = _copy("chc-node.service", tmp_path, text.replace("ProtectHome=", "ProtectHomes="))
    result = _verify(bad)
    assert "Unknown key 'ProtectHomes'" in result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("unit", ["chc-node.service", "chc-hub.service"])
def test_the_exposure_score_is_ok(unit: str, tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [
            ANALYZE,
            "security",
            "--offline=yes",
            "--no-pager",
            f"--threshold={EXPOSURE_THRESHOLD}",
            str(_copy(unit, tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level" in result.stdout


@pytest.mark.parametrize("unit", ["chc-node.service", "chc-hub.service"])
def test_the_hardening_options_are_set(unit: str) -> None:
    service = _service(unit)
    expected = {
        "User": "chc",
        "DynamicUser": "no",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
        "MemoryDenyWriteExecute": "yes",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "UMask": "0077",
    }
    assert {k: service.get(k) for k in expected} == expected
    # Stopping waits for the drain: drain_grace_s (30 s) and 5 s for handlers.
    assert int(service["TimeoutStopSec"]) > 35
    if unit == "chc-node.service":
        # The ledger's folder is the only one the node may write.
        assert service["ReadWritePaths"] == "/var/lib/chc"
        assert service["StateDirectory"] == "chc"
    else:
        assert "ReadWritePaths" not in service


def test_the_service_user_is_declared_for_sysusers() -> None:
    lines = [
        line.split()
        for line in (UNITS / "chc.sysusers.conf").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert [(fields[0], fields[1]) for fields in lines] == [("u", "chc")]
    assert lines[0][-1] == "/usr/sbin/nologin"


def _runtime_closure(name: str, seen: set[str]) -> set[str]:
    """The distributions name's runtime requirements (no extras) bring in, transitively."""
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return seen
    seen.add(key)
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return seen  # an environment marker left it out here
    for requirement in map(Requirement, requires):
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            _runtime_closure(requirement.name, seen)
    return seen


def test_memory_deny_write_execute_holds_for_the_runtime_install() -> None:
    # The units set MemoryDenyWriteExecute=yes, which polars cannot run under (its CPU
    # check makes a page executable) and which OpenDP imports whenever it is installed.
    # The node's and hub's install (pip install ., the image's too) must not bring it in;
    # test_entrypoints.py runs the node under the kernel's equivalent to show the rest can.
    closure = _runtime_closure("chc", set())
    assert {"duckdb", "numpy", "opendp", "grpcio"} <= closure
    assert "polars" not in closure
