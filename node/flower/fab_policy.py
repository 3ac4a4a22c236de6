"""The node's rule for a Flower App Bundle (FAB): no code from the hub, ever.

A FAB is a zip that Flower unpacks and puts first on sys.path before it imports the app's
components, so a module shipped in it would override chc's own. A node accepts a FAB only if
it holds pyproject.toml and Flower's metadata and nothing else, and its components name the
chc modules installed on the node; or if the custodian allowlisted its exact sha256 in
node.toml ([learning] allowed_fabs) after reviewing it.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from collections.abc import Sequence

from protocols.flower_wire import CLIENT_APP, SERVER_APP
from queries.errors import PermissionDeniedError

# What `flwr build` / `flwr run` put in a FAB built from a folder holding only pyproject.toml
# (flwr/cli/build.py): the file and a list of the bundled files' hashes.
PYPROJECT = "pyproject.toml"
CONTENT = ".info/CONTENT"
ALLOWED_MEMBERS = frozenset({PYPROJECT, CONTENT})
# The components a chc FAB may name, by their key in [tool.flwr.app.components].
ALLOWED_COMPONENTS = {"clientapp": CLIENT_APP, "serverapp": SERVER_APP}
# Bounds on what the check reads, so a crafted zip cannot make it inflate gigabytes.
MAX_FAB_BYTES = 1 << 20
MAX_MEMBER_BYTES = 256 << 10
# Suffixes that make a file code (named in the refusal so a custodian sees what was sent).
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".pth", ".sh", ".whl")
SHOWN = 8

_verdict: list[str] = []


class FabRefusedError(PermissionDeniedError):
    """The node refuses to run this FAB: it carries code or names modules chc did not install."""


def sha256_of(fab: bytes) -> str:
    """The FAB's sha256 in hex, as the custodian lists it in allowed_fabs."""
    return hashlib.sha256(fab).hexdigest()


def check_fab(fab: bytes, allowed_sha256: Sequence[str]) -> str:
    """Refuse a FAB unless it is code-free and names chc's components, or is allowlisted.

    Returns the verdict ("pyproject-only" or "allowlisted"); raises FabRefusedError with the
    precise reason otherwise.
    """
    digest = sha256_of(fab)
    if digest in {a.lower() for a in allowed_sha256}:
        return "allowlisted"
    short = digest[:12]
    if len(fab) > MAX_FAB_BYTES:
        raise FabRefusedError(f"FAB {short} is {len(fab)} bytes; a code-free FAB is far smaller")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise FabRefusedError(f"FAB {short} is not a zip archive") from None
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        _check_members(short, names)
        info = archive.getinfo(PYPROJECT)
        if info.file_size > MAX_MEMBER_BYTES:
            raise FabRefusedError(f"FAB {short}: pyproject.toml is {info.file_size} bytes")
        raw = archive.open(info).read(MAX_MEMBER_BYTES + 1)
    if len(raw) > MAX_MEMBER_BYTES:
        raise FabRefusedError(f"FAB {short}: pyproject.toml is larger than it says")
    _check_components(short, raw)
    return "pyproject-only"


def _check_members(short: str, names: list[str]) -> None:
    """Only pyproject.toml and Flower's .info/CONTENT, each once."""
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FabRefusedError(f"FAB {short} holds {_shown(duplicates)} more than once")
    extra = sorted(set(names) - ALLOWED_MEMBERS)
    if extra:
        code = [n for n in extra if n.lower().endswith(CODE_SUFFIXES)]
        what = f"code ({_shown(code)})" if code else "files other than pyproject.toml"
        raise FabRefusedError(
            f"FAB {short} carries {what}: the node runs only chc's installed apps, so a FAB "
            f"may hold pyproject.toml alone (found {_shown(extra)}); a custodian may allow "
            f"this exact FAB in [learning] allowed_fabs after review"
        )
    if PYPROJECT not in names:
        raise FabRefusedError(f"FAB {short} has no pyproject.toml")


def _check_components(short: str, raw: bytes) -> None:
    """[tool.flwr.app.components] must name exactly chc's installed modules."""
    try:
        project = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise FabRefusedError(f"FAB {short}: pyproject.toml is not valid UTF-8 TOML") from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components") if isinstance(app, dict) else None
    if not isinstance(components, dict):
        raise FabRefusedError(f"FAB {short}: pyproject.toml has no [tool.flwr.app.components]")
    for key, ref in sorted(components.items()):
        expected = ALLOWED_COMPONENTS.get(key)
        if expected is None:
            raise FabRefusedError(
                f"FAB {short} names a component {key!r}; chc FABs have only "
                f"{sorted(ALLOWED_COMPONENTS)}"
            )
        if ref != expected:
            raise FabRefusedError(
                f"FAB {short} names {key} {str(ref)[:100]!r}; this node runs only {expected!r}"
            )
    if components.get("clientapp") != CLIENT_APP:
        raise FabRefusedError(f"FAB {short} names no clientapp")


def _shown(names: list[str]) -> str:
    shown = ", ".join(repr(n[:80]) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def record_verdict(verdict: str) -> None:
    """Remember this process's verdict on its FAB, for the ClientApp to report."""
    _verdict[:] = [verdict]


def recorded_verdict() -> str:
    """The verdict recorded in this process, or "not checked" if the check did not run."""
    return _verdict[0] if _verdict else "not checked"
