"""The standard gRPC health service (grpc.health.v1.Health) of a node or hub.

NOT_SERVING until the server has started, SERVING while it serves, NOT_SERVING for good
from the moment a drain begins (so a load balancer or orchestrator stops sending work
before the listener closes). The overall status ("") and each served service's name (e.g.
"chc.v1.Node") are reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"


class Health:
    """One process's health status, served on every gRPC server it is added to."""

    def __init__(self, services: Sequence[str]) -> None:
        self.services: tuple[str, ...] = (health.OVERALL_HEALTH, *services)
        self.servicer = health.HealthServicer()
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set(self, status: int) -> None:
        for name in self.services:
            self.servicer.set(name, status)

    def add_to(self, server: grpc.Server) -> None:
        """Serve the health service on server too (the main port, or a probe listener)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def serving(self) -> None:
        """Report SERVING (once the server has started; ignored once draining)."""
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def drain(self) -> None:
        """Report NOT_SERVING from now on, whatever is set later."""
        self.servicer.enter_graceful_shutdown()


def check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """Ask a server's health service for service's status (a probe's or a test's call)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
