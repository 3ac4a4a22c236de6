"""A federation laid out by `chc federation init` starts from its files as written and answers.

Real `chc-node serve` and `chc hub serve` processes on loopback with mutual TLS, each given
only its generated node.toml or hub.toml (no flag overrides), over synthetic OMOP data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator import cli as chc_cli
from coordinator.analyst.client import Federation
from coordinator.local import synth
from protocols.process import read_ready_file
from queries.results import NodeStatus
from queries.spec import Query

PERSONS = 4_000
STARTUP_S = 90.0


@dataclass(frozen=True)
class Generated:
    folder: Path
    hub: str


def _free_ports(n: int) -> list[int]:
    """n loopback ports free right now (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _spawn(args: list[str], ready: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args, "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _wait(procs: dict[Path, tuple[subprocess.Popen[bytes], Path]]) -> None:
    deadline = time.monotonic() + STARTUP_S
    for ready, (proc, log) in procs.items():
        while read_ready_file(ready) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no start within {STARTUP_S} s:\n{log.read_text()}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generated]:
    root = tmp_path_factory.mktemp("fedinit")
    data = synth.generate_federation(PERSONS, root / "data", seed=11)
    hub_port, *node_ports = _free_ports(1 + len(synth.REGIONS))
    fed = root / "fed"
    args = ["federation", "init", str(fed), "--hub", f"127.0.0.1:{hub_port}"]
    for region, port in zip(synth.REGIONS, node_ports, strict=True):
        args += ["--node", f"{region.slug}={data[region.slug]}@127.0.0.1:{port}"]
    run = CliRunner().invoke(chc_cli.app, args)
    assert run.exit_code == 0, run.output
    procs: dict[Path, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for region in synth.REGIONS:
            config = fed / "node" / region.slug / "node.toml"
            ready, log = root / f"{region.slug}.ready", root / f"{region.slug}.log"
            procs[ready] = (_spawn(["node", "serve", "--config", str(config)], ready, log), log)
        _wait(procs)
        hub_config = fed / "hub" / "hub" / "hub.toml"
        ready, log = root / "hub.ready", root / "hub.log"
        args = ["coordinator", "hub", "serve", "--config", str(hub_config)]
        procs[ready] = (_spawn(args, ready, log), log)
        _wait({ready: procs[ready]})
        yield Generated(folder=fed, hub=f"127.0.0.1:{hub_port}")
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_generated_federation_answers_a_query(generated: Generated) -> None:
    analyst = generated.folder / "analyst" / "analyst"
    with Federation(generated.hub, analyst) as fed:
        result = fed.query(Query(view="persons", rho=0.1, group_by=("sex",)))
    assert [o.status for o in result.nodes] == [NodeStatus.OK] * len(synth.REGIONS)
    assert {o.node for o in result.nodes} == {r.slug for r in synth.REGIONS}
    assert not result.partial
    assert [o.rho_charged for o in result.nodes] == pytest.approx([0.1] * len(synth.REGIONS))
    regions = {row["region"] for row in result.table.to_pylist()}
    assert len(regions) == len(synth.REGIONS) + 1  # every region and the pooled row


def _chc(*args: str) -> tuple[int, str]:
    run = CliRunner().invoke(chc_cli.app, list(args))
    return run.exit_code, run.stdout


def test_chc_nodes_json_lists_every_column_and_the_reference_date(generated: Generated) -> None:
    analyst = str(generated.folder / "analyst" / "analyst")
    code, out = _chc("nodes", "--hub", generated.hub, "--identity", analyst, "--json")
    assert code == 0, out
    payload = json.loads(out)
    assert payload["unavailable"] == []
    assert sorted(n["node"] for n in payload["nodes"]) == sorted(r.slug for r in synth.REGIONS)
    for node in payload["nodes"]:
        # Published by every node (node.toml leaves it to the end of the data).
        assert date.fromisoformat(node["reference_date"]) <= date.today()
        assert node["budget"]["rho_total"] == 10.0
        views = {v["name"]: v for v in node["views"]}
        persons = {c["name"]: c for c in views["persons"]["columns"]}
        assert views["persons"]["max_rows_per_person"] == 1
        assert views["visits"]["max_rows_per_person"] > 1
        assert persons["sex"]["kind"] == "category"
        assert "female" in persons["sex"]["domain"]
        numeric = [c for c in persons.values() if c["kind"] in ("integer", "float")]
        assert numeric, "persons has numeric columns"
        assert all(c["bounds"] is None or c["bounds"][0] <= c["bounds"][1] for c in numeric)
        assert any(c["bounds"] is not None for c in numeric)


def test_chc_nodes_table_shows_numeric_columns_unwrapped(generated: Generated) -> None:
    analyst = str(generated.folder / "analyst" / "analyst")
    code, out = _chc("nodes", "--hub", generated.hub, "--identity", analyst)
    assert code == 0, out
    _, raw = _chc("nodes", "--hub", generated.hub, "--identity", analyst, "--json")
    persons = next(v for v in json.loads(raw)["nodes"][0]["views"] if v["name"] == "persons")
    age_band = next(c for c in persons["columns"] if c["name"] == "age_band")
    # Not a terminal: no 80-column wrapping, so the whole domain is on one line of the table.
    assert ", ".join(age_band["domain"]) in out
    assert max(len(line) for line in out.splitlines()) > 80
    reference = json.loads(raw)["nodes"][0]["reference_date"]
    assert f"reference date {reference}" in out
    assert "integer" in out
    assert "row(s) per person" in out
