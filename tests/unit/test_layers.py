"""The layers are contracts (pyproject.toml, [tool.importlinter]): checked, and shown to bite.

The first test runs import-linter on the real tree. The others build a throw-away tree with
the same five top-level packages and one forbidden import each, and check that the same
contracts refuse it, so a contract that silently stopped matching anything would fail here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("chc", "coordinator", "node", "protocols", "queries")


def _lint(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    command = "from importlinter.cli import lint_imports_command as c; c()"
    return subprocess.run(
        [sys.executable, "-c", command, "--no-cache", "--no-logo", str(config)],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_real_tree_keeps_every_contract() -> None:
    done = _lint(ROOT, ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("coordinator", "node", "the hub and the auditors' tools reach nodes only over protocols/"),
        ("node", "coordinator", "a node never depends on the hub"),
        ("queries", "protocols", "the query language stands on nothing of ours"),
        ("queries", "node", "the query language stands on nothing of ours"),
        ("protocols", "node", "the contract between parties imports neither party"),
        ("protocols", "coordinator", "the contract between parties imports neither party"),
        ("coordinator", "chc", "chc/ is the users' import path; nothing of ours imports it"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, importer: str, imported: str, contract: str
) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "part.py").write_text('"""A module to import."""\n')
    # Nested, as real code is: the contracts cover sub-packages too.
    (tmp_path / importer / "deep").mkdir()
    (tmp_path / importer / "deep" / "__init__.py").write_text("")
    (tmp_path / importer / "deep" / "culprit.py").write_text(f"from {imported} import part\n")
    config = tmp_path / "contracts.toml"
    # The contracts exactly as pyproject.toml states them, nothing else of it.
    section = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = ["[tool.importlinter]", f"root_packages = {json.dumps(section['root_packages'])}"]
    for c in section["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        # JSON strings and lists are TOML ones too.
        lines += [f"{key} = {json.dumps(value)}" for key, value in c.items()]
    config.write_text("\n".join(lines) + "\n")

    done = _lint(tmp_path, config)

    assert done.returncode != 0, done.stdout
    assert f"{contract} BROKEN" in done.stdout
    assert f"{importer}.deep.culprit -> {imported}.part" in done.stdout
    assert "4 kept, 1 broken" in done.stdout
