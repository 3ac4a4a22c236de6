"""A whole federation on loopback: node and hub processes with mutual TLS.

Used by `chc demo`, the integration tests and the benchmarks, so that all three exercise
the same real processes, ports and certificates a deployment would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Any

from coordinator.local import node_toml
from protocols.flower_keys import SUPERNODE_KEY, make_supernode_key
from protocols.flower_process import free_port
from protocols.process import read_ready_file
from protocols.revocation import CRL_FILE
from protocols.security.pki import (
    CA_FILE,
    CERT_FILE,
    Role,
    create_ca,
    issue,
    issue_server_certificate,
)
from queries.errors import ChcError

HUB_NAME = "hub"
ANALYST_NAME = "demo-analyst"
AUDITOR_NAME = "demo-auditor"


class FederationStartError(RuntimeError, ChcError):
    """A node or the hub did not start; the message carries the end of its log."""


@dataclass(frozen=True)
class NodeSetup:
    """How to start one node: generated settings, or a custodian's own node.toml (config)."""

    name: str
    # Where the node's OMOP data is. With config, what that file says (for callers to show):
    # the node reads the file's own setting.
    omop: Path
    title: str = ""
    total_rho: float = 10.0
    max_rho_per_query: float = 1.0
    # Extra node.toml tables (e.g. an [access] policy), merged into the generated file.
    extra_toml: str = ""
    # Data settings (docs/data.md): LSOA -> IMD lookup, pathways served (None: all), the
    # schema of a DuckDB source, and opt-out / consent registers.
    imd_lookup: Path | None = None
    pathways: tuple[str, ...] | None = None
    omop_schema: str | None = None
    consent_registers: tuple[Path, ...] = ()
    # The care sites (ODS codes) the node publishes as `care_site` ([care_sites] publish).
    care_sites: tuple[str, ...] = ()
    # A custodian's node.toml, used as it is but for the keys the local federation owns
    # (coordinator/local/node_toml.py OWNED_KEYS); every setting above but name, omop and
    # title then comes from that file instead, so none may be given.
    config: Path | None = None
    # Outbound-only (docs/outbound.md): the node listens on no port and dials the hub, whose
    # hub.toml lists it with address = "dial".
    dial: bool = False
    # A CRL of the node's own instead of the federation's (fault tests: nodes that disagree
    # on what is revoked).
    crl: Path | None = None

    def __post_init__(self) -> None:
        if self.config is None:
            return
        generated = NodeSetup(name=self.name, omop=self.omop, title=self.title, dial=self.dial)
        if replace(self, config=None) != generated:
            raise ValueError(f"node {self.name}: settings come from {self.config}; give no others")


def _generated_table(setup: NodeSetup, reference_date: date) -> dict[str, Any]:
    """The node.toml table of a node on generated settings (synthetic regions, tests)."""
    table: dict[str, Any] = {
        "omop": str(setup.omop.resolve()),
        "reference_date": reference_date,
    }
    if setup.imd_lookup is not None:
        table["imd_lookup"] = str(setup.imd_lookup.resolve())
    if setup.pathways is not None:
        table["pathways"] = list(setup.pathways)
    if setup.omop_schema is not None:
        table["omop_schema"] = setup.omop_schema
    table["budget"] = {
        "total_rho": setup.total_rho,
        "max_rho_per_query": setup.max_rho_per_query,
    }
    if setup.care_sites:
        table["care_sites"] = {"publish": list(setup.care_sites)}
    if setup.consent_registers:
        table["consent"] = {"registers": [str(p.resolve()) for p in setup.consent_registers]}
    table.update(tomllib.loads(setup.extra_toml))
    return table


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready: Path
    port: int = 0


@dataclass
class LocalFederation:
    """Start nodes and a hub as child processes; stop them on exit."""

    workdir: Path
    nodes: tuple[NodeSetup, ...]
    # For nodes on generated settings; a custodian's node.toml keeps its own (or the node's
    # default when it sets none).
    reference_date: date = date(2025, 12, 31)
    deadline_ms: int = 30_000
    startup_timeout_s: float = 60.0
    # Extra hub.toml tables (e.g. a [release] policy), merged into the generated file.
    hub_extra_toml: str = ""
    # Training over Flower (docs/training.md): the hub runs a SuperLink on loopback with every
    # node's SuperNode key registered, and every node a supervised SuperNode dialling it.
    learning: bool = False
    superlink_port: int = 0
    fleet_port: int = 0
    # More analysts than the demo's one, each with a certificate from the federation's CA
    # (load and fault tests run many analysts at once, each with their own budget).
    analysts: tuple[str, ...] = ()
    # A node's ledger folder (by node name) instead of beside its node.toml: fault tests put
    # one on a small or failing filesystem. The ledger's signing key is created beside it.
    ledger_dirs: dict[str, Path] = field(default_factory=dict)
    # The address the hub dials for a node (by node name) instead of the node's own: fault
    # tests put a TCP proxy in between. TLS is end to end, so the proxy sees only bytes.
    hub_addresses: dict[str, str] = field(default_factory=dict)
    _procs: dict[str, _Proc] = field(default_factory=dict)
    hub_port: int = 0

    @property
    def pki(self) -> Path:
        """The federation's PKI folder (CA key included: this is a local test federation)."""
        return self.workdir / "pki"

    @property
    def hub_address(self) -> str:
        """Where analysts reach the hub."""
        return f"127.0.0.1:{self.hub_port}"

    def identity_dir(self, role: Role, name: str) -> Path:
        """The identity folder for a party of this federation."""
        return self.pki / role.value / name

    @property
    def analyst_identity(self) -> Path:
        """The demo analyst's identity folder."""
        return self.identity_dir(Role.ANALYST, ANALYST_NAME)

    def analyst_identity_of(self, name: str) -> Path:
        """The identity folder of one of this federation's analysts (see `analysts`)."""
        return self.identity_dir(Role.ANALYST, name)

    def node_port(self, name: str) -> int:
        """The loopback port a node listens on (0 for an outbound-only node)."""
        return self._procs[name].port

    def ledger_path(self, name: str) -> Path:
        """Where a node's ledger is: in its ledger_dirs folder, else beside its node.toml."""
        folder = self.ledger_dirs.get(name, self.workdir / "conf")
        return folder / f"{name}.ledger.sqlite"

    def pid(self, name: str) -> int:
        """The process id of a node or the hub (HUB_NAME), e.g. to stop it with SIGSTOP."""
        return self._procs[name].popen.pid

    def create_pki(self) -> None:
        """A fresh CA and certificates for every node, the hub, an analyst and an auditor."""
        if not (self.pki / CA_FILE).exists():
            create_ca(self.pki)
        wanted = [(Role.NODE, n.name) for n in self.nodes] + [
            (Role.HUB, HUB_NAME),
            (Role.ANALYST, ANALYST_NAME),
            (Role.AUDITOR, AUDITOR_NAME),
            *((Role.ANALYST, name) for name in self.analysts),
        ]
        for role, name in wanted:
            if not (self.identity_dir(role, name) / CERT_FILE).exists():
                issue(self.pki, role=role, name=name)

    def _spawn(self, name: str, args: list[str]) -> _Proc:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "run" / f"{name}.ready"
        ready.parent.mkdir(parents=True, exist_ok=True)
        ready.unlink(missing_ok=True)
        log_path = logs / f"{name}.log"
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", *args, "--ready-file", str(ready)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not them
            )
        proc = _Proc(name=name, popen=popen, log=log_path, ready=ready)
        self._procs[name] = proc
        return proc

    def _wait_ready(self, procs: list[_Proc]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        waiting = list(procs)
        while waiting:
            for proc in list(waiting):
                info = read_ready_file(proc.ready)
                if info is not None and isinstance(info.get("port"), int):
                    proc.port = int(info["port"])  # type: ignore[call-overload]
                    waiting.remove(proc)
                elif proc.popen.poll() is not None:
                    raise FederationStartError(
                        f"{proc.name} exited with code {proc.popen.returncode}:\n" + _tail(proc.log)
                    )
            if waiting and time.monotonic() > deadline:
                names = ", ".join(p.name for p in waiting)
                raise FederationStartError(
                    f"{names} did not start within {self.startup_timeout_s:g} s:\n"
                    + "\n".join(_tail(p.log) for p in waiting)
                )
            time.sleep(0.05)

    def start_node(self, setup: NodeSetup, *, port: int = 0) -> None:
        """Write a node's config and start it (also used to restart a stopped node)."""
        conf_dir = self.workdir / "conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        config = conf_dir / f"{setup.name}.toml"
        if setup.config is not None:
            table = node_toml.custodian_table(setup.config, source=f"node {setup.name}")
            comment = (
                f"Written by the local federation from {setup.config.absolute()}: that\n"
                "file's settings, relative paths made absolute, but for the keys the federation\n"
                f"owns ({', '.join(node_toml.OWNED_KEYS)}; coordinator/local/node_toml.py)."
            )
        else:
            table = _generated_table(setup, self.reference_date)
            comment = "Written by the local federation (coordinator/local/federation.py)."
        if self.learning:
            # Through the hub's Fleet proxy (mutual TLS, nodes only), as across a network;
            # the node's forwarder adds its certificate and checks the hub's by name.
            table["learning"] = {"hub_fleet": f"127.0.0.1:{self.fleet_port}", "hub_name": HUB_NAME}
        if setup.dial:
            # The hub's port is chosen before any node starts (start), so a dialling node
            # knows where the hub will be; it dials with backoff until the hub is up.
            table["hub"] = {"dial": self.hub_address, "hub_name": HUB_NAME}
        table = node_toml.with_owned_keys(
            table,
            name=setup.name,
            identity=self.identity_dir(Role.NODE, setup.name),
            # The federation's own CRL, so `chc pki revoke` takes effect at once.
            crl=setup.crl or self.pki / CRL_FILE,
            listen=f"127.0.0.1:{port}",
            # Beside this node.toml (where the node's default would put it), unless ledger_dirs
            # names a folder for it: a fresh ledger.
            ledger=self.ledger_path(setup.name),
        )
        config.write_text(node_toml.dumps(table, comment=comment), encoding="utf-8")
        self._spawn(setup.name, ["node", "serve", "--config", str(config)])

    def start(self) -> None:
        """Create the PKI, start every node, then the hub, and wait until all listen."""
        self.create_pki()
        if self.learning:
            self._prepare_learning()
        if any(n.dial for n in self.nodes) and not self.hub_port:
            self.hub_port = free_port()
        for setup in self.nodes:
            self.start_node(setup)
        self._wait_ready([self._procs[n.name] for n in self.nodes])
        self.start_hub(port=self.hub_port)

    def start_hub(self, *, port: int = 0) -> None:
        """Write hub.toml for the running nodes and start the hub (also to restart it)."""
        hub_conf = self.workdir / "conf" / "hub.toml"
        nodes: list[dict[str, str]] = [
            {
                "name": n.name,
                "title": n.title or n.name,
                "address": self._hub_address_of(n),
            }
            for n in self.nodes
        ]
        hub_table: dict[str, Any] = {
            "identity": str(self.identity_dir(Role.HUB, HUB_NAME).resolve()),
            "listen": f"127.0.0.1:{port}",
            "deadline_ms": self.deadline_ms,
            "crl": str((self.pki / CRL_FILE).resolve()),
            "nodes": nodes,
        }
        if self.learning:
            hub_table["learning"] = {
                "superlink_port": self.superlink_port,
                "superlink_tls": str((self.workdir / "superlink_tls").resolve()),
                "workdir": str((self.workdir / "superlink").resolve()),
                "fleet_listen": f"127.0.0.1:{self.fleet_port}",
            }
            for entry in nodes:
                folder = self.identity_dir(Role.NODE, entry["name"])
                entry["supernode_key"] = str((folder / f"{SUPERNODE_KEY}.pub").resolve())
        hub_table.update(tomllib.loads(self.hub_extra_toml))
        hub_conf.write_text(
            node_toml.dumps(hub_table, comment="Written by the local federation."),
            encoding="utf-8",
        )
        hub = self._spawn(HUB_NAME, ["coordinator", "hub", "serve", "--config", str(hub_conf)])
        self._wait_ready([hub])
        self.hub_port = hub.port

    def _hub_address_of(self, setup: NodeSetup) -> str:
        """The address hub.toml gives for a node: "dial" for an outbound-only one."""
        if setup.dial:
            return "dial"
        return self.hub_addresses.get(setup.name, f"127.0.0.1:{self._procs[setup.name].port}")

    def _prepare_learning(self) -> None:
        """The SuperLink's server certificate, its port, and every node's SuperNode key."""
        issue_server_certificate(
            self.pki,
            name="superlink",
            out_dir=self.workdir / "superlink_tls",
            hosts=("localhost", "127.0.0.1"),
        )
        self.superlink_port = self.superlink_port or free_port()
        self.fleet_port = self.fleet_port or free_port()
        for setup in self.nodes:
            # Where the node's own supervisor looks for it (node/flower/supernode.py).
            make_supernode_key(self.identity_dir(Role.NODE, setup.name))

    def restart_hub(self, *, sig: int = signal.SIGTERM) -> None:
        """Stop the hub (SIGKILL simulates a crash) and start it again on the same port."""
        port = self.hub_port
        self.stop_process(HUB_NAME, sig=sig)
        self.start_hub(port=port)

    def restart_node(
        self,
        name: str,
        *,
        sig: int = signal.SIGTERM,
        down_s: float = 0.0,
        while_down: Callable[[], object] | None = None,
    ) -> None:
        """Stop a node (SIGKILL simulates a crash) and start it again on the same port.

        For fault tests: down_s keeps it stopped that long first (longer than a query's
        deadline, so that the hub's retries cannot hide the outage), and while_down is
        called while it is stopped (e.g. to repair the disk its ledger is on).
        """
        setup = next(n for n in self.nodes if n.name == name)
        port = self._procs[name].port
        self.stop_process(name, sig=sig)
        time.sleep(down_s)
        if while_down is not None:
            while_down()
        self.start_node(setup, port=port)
        self._wait_ready([self._procs[name]])

    def stop_process(
        self, name: str, *, sig: int = signal.SIGTERM, timeout_s: float = 10.0
    ) -> None:
        """Stop one process (SIGTERM lets it finish calls; SIGKILL simulates a crash)."""
        proc = self._procs.get(name)
        if proc is None or proc.popen.poll() is not None:
            return
        proc.popen.send_signal(sig)
        try:
            proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()

    def stop(self) -> None:
        """Stop the hub, then every node."""
        for name in [HUB_NAME, *(n.name for n in self.nodes)]:
            self.stop_process(name)

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(f"  | {line}" for line in text[-lines:])
