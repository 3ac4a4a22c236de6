"""The containers' and units' own commands, run for real: bootstrap, four nodes, the hub.

No container engine runs here, so instead of `docker compose up` this runs what compose
would start, in its order, each command read from compose.yaml or the Dockerfile target it
builds (tests/deploy/_containers.py maps the containers' paths and ports to this machine):
the bootstrap's script (twice: `up` runs it again, and it must then do nothing), each
node's `chc-node serve`, waiting on each node's healthcheck command as `service_healthy`
does, then the hub's, then a pooled query through the hub's published port, then SIGTERM
as `docker compose stop` sends it. Then the systemd units' ExecStart lines, under
the kernel's own forms of their MemoryDenyWriteExecute, NoNewPrivileges and UMask
(tests/deploy/_harden.py).

CHC_PERSONS is lowered to 400 persons per region so the whole module takes seconds; the
commands are otherwise untouched.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from coordinator import cli as chc_cli
from coordinator.analyst.client import Federation
from queries.results import NodeStatus
from queries.spec import Query
from tests.deploy import _containers as c

pytestmark = pytest.mark.integration

NODES = ("nenc", "nwc", "yh", "gm")
PERSONS = "400"
HEALTHY_WITHIN_S = 90.0
UNITS = c.REPO / "deploy" / "systemd"


@dataclass
class Running:
    services: dict[str, c.Service]
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    project: Path
    ports: c.Ports
    bootstrap_runs: list[subprocess.CompletedProcess[str]]


def _wait_healthy(service: c.Service, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    while True:
        assert proc.poll() is None, f"{service.name} exited {proc.returncode}:\n{log.read_text()}"
        result = service.healthy()
        if result.returncode == 0:
            assert "SERVING" in result.stdout
            return
        assert time.monotonic() < deadline, f"{service.name} never healthy:\n{log.read_text()}"
        time.sleep(0.2)


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    for proc in procs.values():
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    compose = c.load_compose()
    work = tmp_path_factory.mktemp("compose")
    # A copy of the compose folder: its bind-mounted files, and the PKI folder made first.
    project = work / "project"
    project.mkdir()
    (project / "bootstrap.sh").symlink_to(c.COMPOSE_DIR / "bootstrap.sh")
    (project / "federation").mkdir()
    volumes = work / "volumes"
    ports = c.Ports(frozenset(compose["services"]))
    services = {
        name: c.lay_out(compose, name, project=project, volumes=volumes, ports=ports)
        for name in compose["services"]
    }
    bootstrap = services["bootstrap"]
    runs = []
    for _ in range(2):
        runs.append(
            subprocess.run(
                bootstrap.argv(),
                env=bootstrap.env({"CHC_PERSONS": PERSONS}),
                cwd=bootstrap.root / "tmp",
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        )
        assert runs[-1].returncode == 0, runs[-1].stdout + runs[-1].stderr
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        for name in (*NODES, "hub"):
            service = services[name]
            for dependency, condition in c.depends(service.spec).items():
                # Compose's order: bootstrap done, nodes healthy, then the hub.
                if condition == "service_healthy":
                    assert dependency in procs, f"{name} depends on {dependency}, not started"
            c.materialise_configs(service)
            logs[name] = work / f"{name}.log"
            procs[name] = service.popen(logs[name])
            if name == NODES[-1]:
                for node in NODES:
                    _wait_healthy(services[node], procs[node], logs[node])
        _wait_healthy(services["hub"], procs["hub"], logs["hub"])
        yield Running(services, procs, logs, project, ports, runs)
    finally:
        _stop(procs)


def test_bootstrap_writes_the_federation_once(running: Running) -> None:
    first, second = running.bootstrap_runs
    assert "federation ready" in first.stdout
    assert "nothing to do" in second.stdout
    pki = running.project / "federation" / "pki"
    for name in NODES:
        assert (pki / "node" / name / "identity" / "key.pem").stat().st_mode & 0o077 == 0
    # Every secret and config compose mounts is a file the bootstrap wrote.
    compose = c.load_compose()
    for kind in ("secrets", "configs"):
        for name, spec in compose[kind].items():
            assert (running.project / spec["file"]).is_file(), f"{kind}.{name}: {spec['file']}"


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def _hub_memory_request_mib() -> float:
    deployment = yaml.safe_load((c.REPO / "deploy" / "k8s" / "hub" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    request = str(container["resources"]["requests"]["memory"])
    assert request.endswith("Mi"), request
    return float(request.removesuffix("Mi"))


def test_the_hub_pools_a_query_over_the_four_nodes(running: Running) -> None:
    analyst = running.project / "federation" / "pki" / "analyst" / "analyst"
    hub = f"127.0.0.1:{running.ports.host_port('hub', 50050)}"  # its published port
    with Federation(hub, analyst) as fed:
        result = fed.query(Query(view="persons", rho=0.1, group_by=("sex",)))
    assert sorted(o.node for o in result.nodes) == sorted(NODES)
    assert [o.status for o in result.nodes] == [NodeStatus.OK] * len(NODES)
    # The hub's resident memory after a pooled query fits the memory the Kubernetes
    # Deployment requests for it (deploy/k8s/hub/deployment.yaml sizes it from this).
    rss_mib = _rss_mib(running.procs["hub"].pid)
    assert rss_mib < _hub_memory_request_mib(), f"hub RSS {rss_mib:.0f} MiB"
    # Each node's ledger is on its own volume, where its node.toml puts it.
    for name in NODES:
        ledger = running.project.parent / "volumes" / f"{name}-ledger" / f"{name}.ledger.sqlite"
        assert ledger.is_file(), ledger


def _audit(*args: str) -> tuple[int, str]:
    run = CliRunner().invoke(chc_cli.app, ["audit", *args])
    return run.exit_code, run.output


def test_a_live_ledger_backup_verifies_and_restoring_it_is_caught(
    running: Running, tmp_path: Path
) -> None:
    """docs/deployment.md's backup, taken while the node serves, and what a restore shows."""
    pki = running.project / "federation" / "pki"
    ca = str(pki / "ca.pem")
    volume = running.project.parent / "volumes" / "nenc-ledger"
    live = volume / "nenc.ledger.sqlite"
    backup = tmp_path / "nenc.ledger.sqlite"
    # The documented online backup: SQLite's backup API (`sqlite3 LEDGER ".backup COPY"`),
    # which copies a consistent snapshot, WAL included, while the node keeps writing.
    with sqlite3.connect(live) as source, sqlite3.connect(backup) as copy:
        source.backup(copy)
    shutil.copy2(volume / "nenc.ledger.pub", tmp_path / "nenc.ledger.pub")
    code, out = _audit("verify", str(backup), "--ca", ca)
    assert code == 0, out
    # The node answers more queries; the auditors export the ledger as it now is.
    hub = f"127.0.0.1:{running.ports.host_port('hub', 50050)}"
    with Federation(hub, pki / "analyst" / "analyst") as fed:
        fed.query(Query(view="persons", rho=0.05))
    newer = tmp_path / "newer.jsonl"
    code, out = _audit("export", str(live), "--out", str(newer))
    assert code == 0, out
    # Restoring the older copy would take the head back: it still verifies on its own,
    # but not against the auditors' later export, whose last entries it lacks.
    code, out = _audit("verify", str(backup), "--ca", ca, "--previous", str(newer))
    assert code == 1, out
    assert "entry 3: was in the earlier copy" in out  # the query answered after the backup


def test_sigterm_drains_every_service_and_health_then_fails(running: Running) -> None:
    for name in ("hub", *NODES):  # the reverse of the start order, as compose stops them
        proc = running.procs[name]
        proc.send_signal(signal.SIGTERM)
        grace = int(str(running.services[name].spec["stop_grace_period"]).rstrip("s"))
        assert proc.wait(timeout=grace) == 0, running.logs[name].read_text()
        assert running.services[name].healthy().returncode == 1


# --- systemd units --------------------------------------------------------------------


def _exec_start(unit: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / unit)
    return shlex.split(parser["Service"]["ExecStart"])


def test_the_units_exec_start_serves_and_drains(running: Running, tmp_path: Path) -> None:
    """chc-node.service's and chc-hub.service's ExecStart on the compose federation's files.

    /etc/chc and /var/lib/chc (the units' ConfigurationDirectory and StateDirectory) are
    folders here; the /opt/chc/venv/bin executables are this venv's. Both run under the
    kernel's forms of the units' MemoryDenyWriteExecute, NoNewPrivileges and UMask, and
    answer a query (node nenc only: the other three are not started here).
    """
    pki = running.project / "federation" / "pki"
    ports = c.Ports(frozenset({"nenc"}))
    # polars is in this dev venv, not in a node's install (which the units'
    # MemoryDenyWriteExecute needs, test_systemd_units.py): hide it, as that install lacks it.
    hide = tmp_path / "no-polars"
    (hide / "polars").mkdir(parents=True)
    (hide / "polars" / "__init__.py").write_text("raise ImportError('not installed')\n")
    harden = [sys.executable, str(Path(__file__).with_name("_harden.py"))]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    health: dict[str, str] = {}
    configs: dict[str, Path] = {}
    try:
        for unit, name, folder, config in (
            ("chc-node.service", "nenc", pki / "node" / "nenc", "node.toml"),
            ("chc-hub.service", "hub", pki / "hub" / "hub", "hub.toml"),
        ):
            root = tmp_path / unit
            etc, state = root / "etc" / "chc", root / "var" / "lib" / "chc"
            etc.mkdir(parents=True)
            state.mkdir(parents=True, mode=0o700)
            (etc / "identity").symlink_to(folder / "identity")
            # Named as the hub.toml of the compose federation knows it, for its address.
            service = c.Service(name, {}, root, running.project, ports, {"/etc/chc": etc})
            service.mounts["/var/lib/chc"] = state
            text = (folder / config).read_text(encoding="utf-8")
            configs[unit] = etc / config
            configs[unit].write_text("\n".join(map(service.translate, text.splitlines())) + "\n")
            argv = [service.translate(a) for a in _exec_start(unit)]
            assert argv[0].startswith("/opt/chc/venv/bin/")
            argv[0] = str(c.VENV_BIN / Path(argv[0]).name)
            health[unit] = argv[argv.index("--health-listen") + 1]
            logs[unit] = tmp_path / f"{unit}.log"
            env = {**os.environ, "HOME": str(root), "FLWR_TELEMETRY_ENABLED": "0"}
            env["PYTHONPATH"] = str(hide)
            with logs[unit].open("wb") as out:
                procs[unit] = subprocess.Popen(
                    [*harden, *argv], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=state
                )
        probe = [str(c.VENV_BIN / "python"), "-m", "protocols.observability.health_probe"]
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        for unit, proc in procs.items():
            while subprocess.run(
                [*probe, health[unit]], capture_output=True, check=False
            ).returncode:
                assert proc.poll() is None, logs[unit].read_text()
                assert time.monotonic() < deadline, logs[unit].read_text()
                time.sleep(0.2)
        hub = tomllib.loads(configs["chc-hub.service"].read_text())["listen"]
        with Federation(hub, pki / "analyst" / "analyst") as fed:
            result = fed.query(Query(view="persons", rho=0.05, group_by=("sex",)))
        statuses = {o.node: o.status for o in result.nodes}
        assert statuses["nenc"] == NodeStatus.OK, logs["chc-node.service"].read_text()
        for unit in ("chc-hub.service", "chc-node.service"):
            procs[unit].send_signal(signal.SIGTERM)
            assert procs[unit].wait(timeout=45) == 0, logs[unit].read_text()  # TimeoutStopSec
    finally:
        _stop(procs)
    ledger = tmp_path / "chc-node.service" / "var" / "lib" / "chc" / "nenc.ledger.sqlite"
    assert ledger.is_file()
    # UMask=0077: what the node writes is its own.
    assert ledger.stat().st_mode & 0o077 == 0
