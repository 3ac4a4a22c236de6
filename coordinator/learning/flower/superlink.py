"""The hub's Flower SuperLink: a supervised child process on loopback, with TLS and node auth.

In open-source Flower 1.42 the Control API (submit and stop runs, register SuperNodes) is
unauthenticated and served on the same HTTPS port as the Fleet API the SuperNodes use, so the
SuperLink binds to 127.0.0.1 only (docs/training.md, "Flower deployment"). SuperNodes prove
who they are with an OpenSSH ECDSA key registered here (`--enable-supernode-auth`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from protocols.flower_process import (
    FlowerChild,
    FlowerError,
    FlowerStartError,
    Started,
    flower_env,
    free_port,
    venv_bin,
    wait_listening,
)
from protocols.security.pki import CA_FILE, CERT_FILE, KEY_FILE, issue_server_certificate

log = logging.getLogger("chc.hub.flower")

START_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0
# Words in the flwr CLI's output that mean "the SuperLink is not answering yet", worth a retry.
_NOT_READY = ("connect", "unavailable", "refused", "timed out", "timeout")


@dataclass(frozen=True)
class SuperLinkTls:
    """The SuperLink's TLS files: the federation CA, its server certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def issue(cls, pki_dir: Path, out_dir: Path) -> SuperLinkTls:
        """Issue a server-only certificate for 127.0.0.1 and localhost from the federation CA."""
        folder = issue_server_certificate(
            pki_dir, name="superlink", out_dir=out_dir, hosts=("localhost", "127.0.0.1")
        )
        return cls(ca=folder / CA_FILE, cert=folder / CERT_FILE, key=folder / KEY_FILE)


class SuperLink(Started):
    """A `flower-superlink` child on 127.0.0.1 and the flwr CLI connection that reaches it.

    Everything it writes (its database, logs, FLWR_HOME folders, the CLI's config.toml) goes
    under workdir.
    """

    def __init__(
        self,
        workdir: Path,
        tls: SuperLinkTls,
        *,
        port: int | None = None,
        connection: str = "chc",
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.workdir = workdir
        self.tls = tls
        self.port = port or free_port()
        self.connection = connection
        self.start_timeout_s = start_timeout_s
        self.cli_home = workdir / "cli_home"
        self._child: FlowerChild | None = None

    @property
    def address(self) -> str:
        """host:port of the Fleet (and Control) API, for SuperNodes and the CLI."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The SuperLink's own log (the ServerApp's output goes here too)."""
        return self.workdir / "logs" / "superlink.log"

    def start(self) -> None:
        """Start the SuperLink and wait until it listens; raise FlowerStartError otherwise."""
        for path in (self.tls.ca, self.tls.cert, self.tls.key):
            if not path.is_file():
                raise FlowerStartError(f"SuperLink TLS file {path} does not exist")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(venv_bin() / "flower-superlink"),
            "--ssl-ca-certfile",
            str(self.tls.ca),
            "--ssl-certfile",
            str(self.tls.cert),
            "--ssl-keyfile",
            str(self.tls.key),
            "--enable-supernode-auth",
            # Otherwise the SuperLink runs `uv sync` on a FAB's dependencies, from the network.
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.workdir / "linkstate.db"),
        ]
        child = FlowerChild(
            "flower-superlink", argv, flower_env(self.workdir / "superlink_home"), self.log_path
        )
        child.start()
        self._child = child
        try:
            wait_listening(child, self.port, self.start_timeout_s)
        except FlowerStartError:
            child.stop()
            raise
        self._write_cli_config()
        log.info("SuperLink listening on %s (log %s)", self.address, self.log_path)

    def stop(self) -> None:
        """Stop the SuperLink and the ServerApp processes it started."""
        if self._child is not None:
            self._child.stop()

    def running(self) -> bool:
        """Whether the SuperLink process is alive."""
        return self._child is not None and self._child.running()

    def cli_env(self) -> dict[str, str]:
        """The environment for the flwr CLI, whose FLWR_HOME holds this connection."""
        return flower_env(self.cli_home)

    def cli(
        self, args: list[str], *, timeout_s: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run `flwr ARGS` against this SuperLink, bounded by timeout_s (no check of its code)."""
        try:
            return subprocess.run(  # noqa: S603 - argv built by us, no shell
                [str(venv_bin() / "flwr"), *args],
                env=self.cli_env(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise FlowerError(
                f"`flwr {args[0]} {args[1] if len(args) > 1 else ''}` did not finish within "
                f"{timeout_s:g} s (SuperLink log {self.log_path})"
            ) from None

    def register(
        self, name: str, public_key_path: Path, *, timeout_s: float = CLI_TIMEOUT_S
    ) -> None:
        """Register a SuperNode's OpenSSH public key, retrying while the SuperLink warms up."""
        if not public_key_path.is_file():
            raise FlowerError(f"SuperNode public key {public_key_path} does not exist")
        deadline = time.monotonic() + timeout_s
        args = ["supernode", "register", str(public_key_path), self.connection, "--name", name]
        while True:
            left = max(1.0, deadline - time.monotonic())
            done = self.cli(args, timeout_s=left)
            if done.returncode == 0:
                log.info("registered SuperNode %s with the SuperLink", name)
                return
            output = (done.stdout + done.stderr).strip()
            retry = any(word in output.lower() for word in _NOT_READY)
            if not retry or time.monotonic() > deadline:
                raise FlowerError(
                    f"could not register SuperNode {name!r} ({public_key_path}) with the "
                    f"SuperLink at {self.address}: `flwr supernode register` exited with "
                    f"{done.returncode}:\n{_last_lines(output)}"
                )
            time.sleep(0.5)

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink knows (`flwr supernode ls`), with their status."""
        done = self.cli(["supernode", "ls", self.connection, "--format", "json"])
        try:
            listed = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise FlowerError(
                f"`flwr supernode ls` gave no JSON (exit {done.returncode}):\n"
                f"{_last_lines(done.stdout + done.stderr)}"
            ) from None
        nodes = listed.get("nodes", []) if isinstance(listed, dict) else []
        return [n for n in nodes if isinstance(n, dict)]

    def wait_online(self, count: int, *, timeout_s: float = 90.0) -> list[dict[str, Any]]:
        """Wait until at least count SuperNodes are online; raise FlowerError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            online = [n for n in self.nodes() if str(n.get("status", "")).lower() == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise FlowerError(
                    f"{len(online)} of {count} SuperNodes online after {timeout_s:g} s "
                    f"(SuperLink log {self.log_path})"
                )
            time.sleep(0.5)

    def _write_cli_config(self) -> None:
        """Write $FLWR_HOME/config.toml for the CLI: the connection, pinned to our CA."""
        self.cli_home.mkdir(parents=True, exist_ok=True)
        config = {
            "superlink": {
                "default": self.connection,
                self.connection: {
                    "address": self.address,
                    "root-certificates": str(self.tls.ca),
                },
            }
        }
        (self.cli_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def _last_lines(text: str, lines: int = 15) -> str:
    kept = text.strip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no output)"
