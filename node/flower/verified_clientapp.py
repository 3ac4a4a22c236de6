"""`chc-flwr-clientapp`: Flower's `flwr-clientapp`, with the node's FAB check first.

The node's SuperExec starts one `flwr-clientapp` process per message, by name; the node's
supervisor (node/flower/supernode.py) puts a folder first on its PATH whose `flwr-clientapp`
runs this instead. Flower's runner pulls the message and the FAB's bytes from the SuperNode,
then unpacks the FAB (`install_from_fab`), then imports the app. We replace that unpack step
with one that checks the FAB first (node/flower/fab_policy.py), so a refused FAB is never
written nor imported; the refusal raises inside Flower's runner, which replies to the
ServerApp with an error (code 2) that carries the reason.

The allowlist comes from the file named by CHC_FAB_ALLOWLIST (written by the supervisor from
node.toml), never from the FAB. The hook relies on flwr 1.42's runner internals, so it refuses
to run on another Flower version rather than run unchecked.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from node.flower.fab_policy import FabRefusedError, check_fab, record_verdict, sha256_of

ALLOWLIST_ENV = "CHC_FAB_ALLOWLIST"
SUPPORTED_FLOWER = "1.42."
_SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("chc.node.flower")


def read_allowlist() -> list[str]:
    """The allowed FAB hashes from the file in $CHC_FAB_ALLOWLIST (none if it is unset).

    A file that is named but unreadable or malformed refuses every FAB: the check fails closed.
    """
    name = os.environ.get(ALLOWLIST_ENV, "")
    if not name:
        return []
    try:
        lines = Path(name).read_text(encoding="utf-8").split()
    except OSError as exc:
        raise FabRefusedError(
            f"the node's FAB allowlist {name} cannot be read ({exc.strerror or exc})"
        ) from None
    bad = [line for line in lines if not _SHA256.fullmatch(line)]
    if bad:
        raise FabRefusedError(f"the node's FAB allowlist {name} holds a line that is no sha256")
    return lines


def write_allowlist(path: Path, allowed: list[str] | tuple[str, ...]) -> Path:
    """Write the allowlist file the wrapper reads (one lower-case sha256 per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{a.lower()}\n" for a in allowed), encoding="utf-8")
    return path


def install_checked(original: Any) -> Any:
    """Wrap Flower's install_from_fab so that it unpacks only a FAB the node accepts."""

    def checked(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            verdict = check_fab(fab_content, read_allowlist())
        except FabRefusedError as exc:
            # The full hash, for a custodian who reviews the FAB and lists it in allowed_fabs.
            log.error("FAB sha256 %s refused: %s", sha256_of(fab_content), exc)
            raise
        record_verdict(verdict)
        log.info("FAB %s accepted (%s)", sha256_of(fab_content)[:12], verdict)
        return original(fab_content, *args, **kwargs)

    return checked


def main() -> None:
    """Run Flower's ClientApp process with the FAB check in front of the unpack step."""
    import flwr
    import flwr.supernode.runtime.run_clientapp as runner

    if not flwr.__version__.startswith(SUPPORTED_FLOWER) or not hasattr(runner, "install_from_fab"):
        sys.exit(
            f"chc-flwr-clientapp supports flwr {SUPPORTED_FLOWER}x only (found "
            f"{flwr.__version__}); refusing to run a ClientApp without the FAB check"
        )
    runner.install_from_fab = install_checked(runner.install_from_fab)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


if __name__ == "__main__":
    main()
