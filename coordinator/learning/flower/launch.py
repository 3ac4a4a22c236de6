"""Submitting a run to the SuperLink with `flwr run --stream`, bounded in time."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from coordinator.learning.flower.superlink import SuperLink
from protocols.flower_process import FlowerError, tail, venv_bin, write_private

log = logging.getLogger("chc.hub.flower")

_RUN_ID = re.compile(r"Successfully started run (\d+)")
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunOutcome:
    """How a `flwr run` ended: its exit code, the run's id, its streamed log and wall time."""

    returncode: int
    run_id: int | None
    output_log: Path
    wall_s: float

    def output(self) -> str:
        """The text `flwr run --stream` printed (Flower's and the ServerApp's log lines)."""
        return self.output_log.read_text(encoding="utf-8", errors="replace")


def run_app(
    superlink: SuperLink, app_dir: Path, run_config: Mapping[str, str], timeout_s: float
) -> RunOutcome:
    """Run the app in app_dir on superlink with run_config, waiting at most timeout_s.

    The overrides go in a 0600 TOML file, not on the command line, so a large payload fits
    and no process listing shows it. On timeout the CLI is killed and the run stopped on the
    SuperLink; a failed CLI raises FlowerError with the end of its output.
    """
    runs = superlink.workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 1_000_000:06d}"
    overrides = runs / f"{stamp}.run_config.toml"
    write_private(overrides, tomli_w.dumps(dict(run_config)).encode())
    output_log = runs / f"{stamp}.flwr_run.log"
    argv = [
        str(venv_bin() / "flwr"),
        "run",
        str(app_dir),
        superlink.connection,
        "--stream",
        "--run-config",
        str(overrides),
    ]
    started = time.monotonic()
    with output_log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - argv built by us, no shell
            argv,
            env=superlink.cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            code = None
    wall = time.monotonic() - started
    run_id = _run_id(output_log)
    if code is None:
        if run_id is not None:
            _stop_run(superlink, run_id)
        raise FlowerError(
            f"`flwr run` did not finish within {timeout_s:g} s; killed it"
            + (f" and stopped run {run_id}" if run_id is not None else "")
            + f". The end of its output ({output_log}):\n{tail(output_log)}"
        )
    if code != 0:
        raise FlowerError(
            f"`flwr run` exited with code {code} after {wall:.1f} s. The end of its output "
            f"({output_log}):\n{tail(output_log)}"
        )
    log.info("flwr run %s finished in %.1f s", run_id, wall)
    return RunOutcome(returncode=code, run_id=run_id, output_log=output_log, wall_s=wall)


def _run_id(output_log: Path) -> int | None:
    match = _RUN_ID.search(output_log.read_text(encoding="utf-8", errors="replace"))
    return int(match.group(1)) if match else None


def _stop_run(superlink: SuperLink, run_id: int) -> None:
    """Ask the SuperLink to stop a run whose CLI we killed, so its ServerApp ends too."""
    try:
        done = superlink.cli(["stop", str(run_id), superlink.connection], timeout_s=STOP_TIMEOUT_S)
    except FlowerError as exc:
        log.warning("could not stop run %d: %s", run_id, exc)
        return
    if done.returncode != 0:
        log.warning("`flwr stop %d` exited with %d", run_id, done.returncode)
