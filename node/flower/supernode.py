"""A node's Flower SuperNode and SuperExec, supervised as child processes.

The SuperNode dials out to the hub's SuperLink (TLS, pinned to the federation CA) and proves
who it is with an OpenSSH ECDSA key the hub registered. It runs with `--isolation process`
so that the SuperExec, which starts a ClientApp process per message, is ours to start: its
PATH resolves `flwr-clientapp` to chc's wrapper, which checks the FAB before anything of it
is written or imported (node/flower/verified_clientapp.py). A shared secret protects the
SuperNode's task API, which only the SuperExec should call. Nothing here restarts a child
that died: the node's serve loop decides.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import tomli_w

from node.config import NodeConfig
from node.flower.verified_clientapp import ALLOWLIST_ENV, write_allowlist
from protocols.flower_keys import make_supernode_key
from protocols.flower_process import (
    FlowerChild,
    FlowerStartError,
    Started,
    flower_env,
    free_port,
    venv_bin,
    wait_listening,
    write_private,
)
from protocols.security.pki import CA_FILE

log = logging.getLogger("chc.node.flower")

START_TIMEOUT_S = 60.0


class SuperNodeProcess(Started):
    """`flower-supernode --isolation process` plus the `flower-superexec` that serves it.

    Everything it writes (FLWR_HOME, logs, the allowlist, the SuperExec secret, the wrapper
    folder) goes under workdir.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        superlink: str,
        root_certificate: Path,
        private_key: Path,
        node_config: Mapping[str, str],
        allowed_fabs: Sequence[str] = (),
        runtime_port: int | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.workdir = workdir
        self.superlink = superlink
        self.root_certificate = root_certificate
        self.private_key = private_key
        self.node_config = dict(node_config)
        self.allowed_fabs = tuple(allowed_fabs)
        self.runtime_port = runtime_port or free_port()
        self.start_timeout_s = start_timeout_s
        self._supernode: FlowerChild | None = None
        self._superexec: FlowerChild | None = None

    @property
    def logs(self) -> Path:
        """The folder of supernode.log and superexec.log (the ClientApps log to the latter)."""
        return self.workdir / "logs"

    def start(self) -> None:
        """Start the SuperNode, wait for its runtime API, then start the SuperExec."""
        for path, what in ((self.root_certificate, "root certificate"), (self.private_key, "key")):
            if not path.is_file():
                raise FlowerStartError(f"SuperNode {what} {path} does not exist")
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr_home"
        secret = self.workdir / "superexec.secret"
        write_private(secret, secrets.token_bytes(32))
        allowlist = write_allowlist(self.workdir / "allowed_fabs.txt", self.allowed_fabs)
        node_config = self.workdir / "node_config.toml"
        node_config.write_text(tomli_w.dumps(self.node_config), encoding="utf-8")
        wrappers = self._write_wrapper()
        env = flower_env(home, path_first=[wrappers], extra={ALLOWLIST_ENV: str(allowlist)})
        supernode = FlowerChild(
            "flower-supernode",
            [
                str(venv_bin() / "flower-supernode"),
                "--superlink",
                self.superlink,
                "--root-certificates",
                str(self.root_certificate),
                "--auth-supernode-private-key",
                str(self.private_key),
                "--node-config",
                str(node_config),
                "--isolation",
                "process",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.runtime_port),
                "--superexec-auth-secret-file",
                str(secret),
            ],
            env,
            self.logs / "supernode.log",
        )
        supernode.start()
        self._supernode = supernode
        try:
            wait_listening(supernode, self.runtime_port, self.start_timeout_s)
            superexec = FlowerChild(
                "flower-superexec",
                [
                    str(venv_bin() / "flower-superexec"),
                    # The runtime API is plain HTTP on loopback; the secret authenticates.
                    "--insecure",
                    "--runtime-api-address",
                    f"127.0.0.1:{self.runtime_port}",
                    "--superexec-auth-secret-file",
                    str(secret),
                    "--parent-pid",
                    str(supernode.pid),
                ],
                env,
                self.logs / "superexec.log",
            )
            superexec.start()
            self._superexec = superexec
        except FlowerStartError:
            self.stop()
            raise
        log.info(
            "SuperNode started for %s (runtime port %d, logs %s)",
            self.superlink,
            self.runtime_port,
            self.logs,
        )

    def _write_wrapper(self) -> Path:
        """A folder whose `flwr-clientapp` runs chc's checking wrapper instead of Flower's."""
        folder = self.workdir / "bin"
        folder.mkdir(parents=True, exist_ok=True)
        script = venv_bin() / "chc-flwr-clientapp"
        target = (
            shlex.quote(str(script))
            if script.is_file()
            else f"{shlex.quote(sys.executable)} -m node.flower.verified_clientapp"
        )
        wrapper = folder / "flwr-clientapp"
        wrapper.write_text(f'#!/bin/sh\nexec {target} "$@"\n', encoding="utf-8")
        wrapper.chmod(0o755)
        return folder

    def stop(self) -> None:
        """Stop the SuperExec, then the SuperNode (which tells the SuperLink it is leaving)."""
        for child in (self._superexec, self._supernode):
            if child is not None:
                child.stop()

    def kill(self) -> None:
        """Kill both at once, as a crash would (the SuperLink notices within a minute)."""
        for child in (self._superexec, self._supernode):
            if child is not None:
                child.kill()

    def exited(self) -> str | None:
        """Which child exited and with what code, or None while both run."""
        for child in (self._supernode, self._superexec):
            if child is not None and child.returncode() is not None:
                return f"{child.name} exited with code {child.returncode()} (log {child.log})"
        return None


def supernode_for(
    config: NodeConfig, config_file: Path, *, superlink: str, grpc_address: str
) -> SuperNodeProcess:
    """The SuperNode of a node served from config_file, dialling superlink.

    Its key pair lives in the node's identity folder (created at first start; the hub
    registers the public half), its working files beside node.toml in <name>.flower/. The
    node_config tells the ClientApp the node's name, where the node's own gRPC service
    listens and its identity folder.
    """
    private, _ = make_supernode_key(config.identity)
    return SuperNodeProcess(
        config_file.parent / f"{config.name}.flower",
        superlink=superlink,
        root_certificate=config.learning.root_certificate or config.identity / CA_FILE,
        private_key=private,
        node_config={
            "node-name": config.name,
            "node-address": grpc_address,
            "identity-dir": str(config.identity),
        },
        allowed_fabs=config.learning.allowed_fabs,
    )
