"""The images' health check, `python -m protocols.observability.health_probe`, on a real server.

A real gRPC server on loopback with the node's and hub's health service (the Health class
they use), through its life: starting (NOT_SERVING), serving, draining, gone.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from protocols.observability.health import Health
from protocols.observability.health_probe import main
from tests.deploy import _containers as c


@pytest.fixture
def server() -> Iterator[tuple[Health, str, grpc.Server]]:
    health = Health(["chc.v1.Node"])
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health.add_to(srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield health, f"127.0.0.1:{port}", srv
    finally:
        srv.stop(None)


def test_the_probe_follows_the_servers_life(
    server: tuple[Health, str, grpc.Server], capsys: pytest.CaptureFixture[str]
) -> None:
    health, address, srv = server
    assert main([address]) == 1  # still starting: views being built
    assert "NOT_SERVING" in capsys.readouterr().out
    health.serving()
    assert main([address]) == 0
    assert main([address, "--service", "chc.v1.Node"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{address}: SERVING"
    health.drain()
    assert main([address]) == 1  # from the first SIGTERM on, for good
    health.serving()
    assert main([address]) == 1
    srv.stop(None)
    assert main([address, "--timeout", "0.5"]) == 1
    assert "no health answer" in capsys.readouterr().out


def test_an_unknown_service_is_not_healthy(server: tuple[Health, str, grpc.Server]) -> None:
    health, address, _ = server
    health.serving()
    assert main([address, "--service", "chc.v1.Nothing"]) == 1


def test_usage_errors_exit_2() -> None:
    assert main(["127.0.0.1:1", "--timeout", "0"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_the_container_command_runs_as_a_module(server: tuple[Health, str, grpc.Server]) -> None:
    health, address, _ = server
    health.serving()
    result = subprocess.run(
        [sys.executable, "-m", "protocols.observability.health_probe", address],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=c.REPO,
    )
    assert (result.returncode, result.stdout.strip()) == (0, f"{address}: SERVING")
