"""A node's check of a Flower App Bundle: pyproject.toml alone, naming chc's own components."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from coordinator.learning.flower.fab import write_app
from node.flower.fab_policy import FabRefusedError, check_fab, sha256_of
from protocols.flower_wire import CLIENT_APP
from queries.errors import PermissionDeniedError

CONTENT = "pyproject.toml,0123abcd,100\n"


def _pyproject(tmp_path: Path) -> str:
    return write_app(tmp_path / "app").read_text()


def _fab(members: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _refusal(fab: bytes, allowed: tuple[str, ...] = ()) -> str:
    with pytest.raises(FabRefusedError) as caught:
        check_fab(fab, allowed)
    return str(caught.value)


def test_a_pyproject_only_fab_is_accepted(tmp_path: Path) -> None:
    fab = _fab({"pyproject.toml": _pyproject(tmp_path), ".info/CONTENT": CONTENT})
    assert check_fab(fab, ()) == "pyproject-only"


def test_the_refusal_is_a_permission_denied_error() -> None:
    assert issubclass(FabRefusedError, PermissionDeniedError)
    assert FabRefusedError.status_name == "PERMISSION_DENIED"


@pytest.mark.parametrize(
    "extra", ["evil.py", "evil.pyc", "native.so", "hook.pth", "chc_pkg/nested/deep.py"]
)
def test_code_of_any_kind_is_refused_by_name(tmp_path: Path, extra: str) -> None:
    fab = _fab({"pyproject.toml": _pyproject(tmp_path), ".info/CONTENT": CONTENT, extra: "x"})
    reason = _refusal(fab)
    assert f"carries code ('{extra}')" in reason
    assert sha256_of(fab)[:12] in reason


def test_any_other_file_is_refused(tmp_path: Path) -> None:
    fab = _fab({"pyproject.toml": _pyproject(tmp_path), "README.md": "hello"})
    reason = _refusal(fab)
    assert "carries files other than pyproject.toml" in reason
    assert "(found 'README.md')" in reason


def test_a_shadowing_package_folder_is_refused(tmp_path: Path) -> None:
    # A FAB goes first on sys.path: node/flower/client_app.py here would replace chc's own.
    fab = _fab({"pyproject.toml": _pyproject(tmp_path), "node/flower/client_app.py": "app = None"})
    assert "carries code ('node/flower/client_app.py')" in _refusal(fab)


def test_a_component_naming_another_module_is_refused(tmp_path: Path) -> None:
    text = _pyproject(tmp_path).replace(CLIENT_APP, "evil.client:app")
    reason = _refusal(_fab({"pyproject.toml": text}))
    assert "names clientapp 'evil.client:app'" in reason
    assert CLIENT_APP in reason


def test_an_unknown_component_is_refused(tmp_path: Path) -> None:
    text = _pyproject(tmp_path).replace(
        "[tool.flwr.app.components]\n", '[tool.flwr.app.components]\nextra = "x:y"\n'
    )
    assert "names a component 'extra'" in _refusal(_fab({"pyproject.toml": text}))


def test_a_fab_without_components_or_pyproject_is_refused() -> None:
    assert "has no [tool.flwr.app.components]" in _refusal(_fab({"pyproject.toml": "a = 1\n"}))
    assert "has no pyproject.toml" in _refusal(_fab({".info/CONTENT": CONTENT}))
    assert "not valid UTF-8 TOML" in _refusal(_fab({"pyproject.toml": "[[["}))


def test_a_duplicated_member_is_refused(tmp_path: Path) -> None:
    text = _pyproject(tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", text)
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("pyproject.toml", text)  # the second one is what an unzip keeps
    assert "'pyproject.toml' more than once" in _refusal(buffer.getvalue())


def test_a_non_zip_is_refused() -> None:
    assert "is not a zip archive" in _refusal(b"#!/bin/sh\necho hello\n")


def test_an_allowlisted_hash_is_accepted_whatever_it_holds(tmp_path: Path) -> None:
    fab = _fab({"pyproject.toml": _pyproject(tmp_path), "reviewed.py": "print(1)"})
    assert check_fab(fab, (sha256_of(fab).upper(),)) == "allowlisted"
    # Another FAB's hash does not help.
    assert "carries code" in _refusal(fab, ("0" * 64,))
