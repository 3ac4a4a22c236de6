"""Where an analyst's hub and identity come from, for the CLI and `Federation.connect()` alike.

Each of the two is taken from the first place that has it: what the caller passed (a flag or
an argument), then the environment (CHC_HUB, CHC_IDENTITY), then a running
`chc demo --keep-running`, which writes its hub address and analyst identity to
~/.chc/demo.json. Resolving both in one place keeps a notebook, `chc query` and `chc ui`
pointing at the same federation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator.local import demo as demo_state
from queries.errors import ConfigError

HUB_ENV = "CHC_HUB"
IDENTITY_ENV = "CHC_IDENTITY"


@dataclass(frozen=True)
class Spelling:
    """How the caller names the hub and the identity, for the error that says what to pass."""

    hub: str
    identity: str


CLI = Spelling(hub="--hub HOST:PORT", identity="--identity DIR")
PYTHON = Spelling(hub='hub="HOST:PORT"', identity='identity="DIR"')


@dataclass(frozen=True)
class Target:
    """The hub to connect to and the analyst identity folder, and where each was found."""

    hub: str
    identity: Path
    hub_from: str
    identity_from: str


def resolve(
    hub: str | None,
    identity: Path | str | None,
    *,
    spelling: Spelling = PYTHON,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """The hub and identity: given, else from CHC_HUB / CHC_IDENTITY, else the running demo's.

    Raises ConfigError naming what is missing and every way to give it.
    """
    env = os.environ if environ is None else environ
    demo = demo_state.read_demo_state()
    # Read at each call: the path is the module's (tests point it elsewhere).
    from_demo = f"the `chc demo` state in {demo_state.DEMO_STATE}"
    found_hub, hub_from = _first(
        (hub or None, "given"),
        (env.get(HUB_ENV) or None, HUB_ENV),
        (demo.get("hub"), from_demo),
    )
    found_identity, identity_from = _first(
        (str(identity) if identity else None, "given"),
        (env.get(IDENTITY_ENV) or None, IDENTITY_ENV),
        (demo.get("identity"), from_demo),
    )
    missing = []
    if found_hub is None:
        missing.append(f"the hub's address ({spelling.hub}, or set {HUB_ENV})")
    if found_identity is None:
        missing.append(f"your analyst identity folder ({spelling.identity}, or set {IDENTITY_ENV})")
    if found_hub is None or found_identity is None:
        raise ConfigError(
            "no "
            + " and no ".join(missing)
            + " was given: give "
            + ("them" if len(missing) > 1 else "it")
            + ", or start `chc demo --keep-running` in another terminal, whose hub and analyst "
            "identity are then the defaults"
        )
    return Target(
        hub=found_hub,
        identity=Path(found_identity).expanduser(),
        hub_from=hub_from,
        identity_from=identity_from,
    )


def _first(*candidates: tuple[str | None, str]) -> tuple[str | None, str]:
    for value, source in candidates:
        if value:
            return value, source
    return None, ""
