"""`python -m protocols.observability.health_probe HOST:PORT`: a container's health check.

Asks the plaintext gRPC health service that a node or hub serves on `health_listen`
(docs/observability.md) for a service's status and exits 0 only if it is SERVING: 1 if it is
anything else (NOT_SERVING while starting or draining) or cannot be reached in time, 2 on a
usage error. It is the HEALTHCHECK of the chc images, the compose services' healthcheck and
what an exec probe can run, so the images need no separate grpc_health_probe binary. It
prints one line saying what it saw, which `docker inspect` keeps with the health log.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from protocols.observability.health import SERVING, check

DEFAULT_TIMEOUT_S = 3.0


def probe(address: str, *, service: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The status the health service at address reports for service ("" is the overall one).

    Raises grpc.RpcError if nothing answers within timeout seconds.
    """
    with grpc.insecure_channel(address) as channel:
        return check(channel, service, timeout=timeout)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protocols.observability.health_probe",
        description="Exit 0 if the gRPC health service at ADDRESS reports SERVING, else 1.",
    )
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT of health_listen")
    parser.add_argument(
        "--service", default="", help='service name, e.g. chc.v1.Node (default "": overall)'
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe; returns the exit code (0 SERVING, 1 not, 2 usage error)."""
    args = _parser().parse_args(argv)
    if not args.timeout > 0:
        print(f"--timeout {args.timeout}: give a positive number of seconds", file=sys.stderr)
        return 2
    try:
        status = probe(args.address, service=args.service, timeout=args.timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        name = code.name if code is not None else "ERROR"
        print(f"{args.address}: no health answer ({name}); is health_listen set to it?")
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
