"""Which calls may be retried, and how.

A call is retried only where a second attempt cannot do anything the first did not: the
node's Execute is idempotent (the same envelope is answered with the release kept for it,
never charged twice: node/service.py), Explain and Describe spend nothing, and the hub's
Submit relays the same envelope again, so its nodes re-send what they kept. FitStep is
idempotent in the same way from protocol 1.3 (node/fitting.py): the very same request (the
envelope, step, coefficients and regions) is answered with the release kept for it, and any
other request for a charged step is refused as a replay. Only UNAVAILABLE is retried (the
connection failed or was lost), never past the call's deadline.

Analyst -> hub: Explain and ListNodes use gRPC's own retry policy (gRFC A6: exponential
backoff, each wait random in [0, backoff), at most 5 attempts), set on the channel; Submit is
re-sent by the client's own loop (coordinator/analyst/client.py) for as long as the query's
deadline allows, since a hub restart takes longer than gRPC's 5 attempts (~3.7 s) cover, and a
quorum not met is not re-sent. Hub -> nodes: the fan-out's own loop
(coordinator/hub/fanout.py), because it must also decide how long a node may take to come
back (a node that restarts answers within the same query; one known to be down is not
waited for), which gRPC's at most 5 attempts within ~3 s cannot express.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

PACKAGE = "chc.v1"
# gRPC caps attempts at 5; with these backoffs the last attempt starts up to ~3 s after the
# first, long enough for a node to restart.
MAX_ATTEMPTS = 5
INITIAL_BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0
BACKOFF_MULTIPLIER = 2.0

HUB_RETRIED = ("Explain", "ListNodes")
# The client's re-sending of a Submit envelope: doubling waits, jittered, while at least
# RESEND_MIN_LEFT_S of the deadline is left.
RESEND_FIRST_BACKOFF_S = 0.2
RESEND_MAX_BACKOFF_S = 2.0
RESEND_MIN_LEFT_S = 1.0

# Hub -> node retries (coordinator/hub/fanout.py): backoff doubles from the first wait up to
# the last, each drawn in [half, all] of it (jitter, so that many hubs do not retry in step),
# for up to RETRY_WINDOW_S of the query's deadline.
NODE_FIRST_BACKOFF_S = 0.1
NODE_MAX_BACKOFF_S = 1.0
RETRY_WINDOW_S = 10.0
# For a node whose last call found it unreachable: long enough for its channel to reconnect.
DOWN_RETRY_WINDOW_S = 1.0


def service_config(service: str, methods: Sequence[str]) -> str:
    """The gRPC service config (JSON) that retries these methods of one service."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": f"{PACKAGE}.{service}", "method": m} for m in methods],
                    "retryPolicy": {
                        "maxAttempts": MAX_ATTEMPTS,
                        "initialBackoff": f"{INITIAL_BACKOFF_S}s",
                        "maxBackoff": f"{MAX_BACKOFF_S}s",
                        "backoffMultiplier": BACKOFF_MULTIPLIER,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def retry_options(service: str, methods: Sequence[str]) -> tuple[tuple[str, str | int], ...]:
    """Channel options enabling the retry policy for these methods."""
    return (("grpc.enable_retries", 1), ("grpc.service_config", service_config(service, methods)))


HUB_CHANNEL_OPTIONS = retry_options("Hub", HUB_RETRIED)
# A node channel reconnects soon after a failure (gRPC waits 1 s and more by default), so that
# a node that has restarted is reached by the fan-out's next attempt.
NODE_CHANNEL_OPTIONS: tuple[tuple[str, str | int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def backoff_s(attempt: int, *, first_s: float, max_s: float) -> float:
    """The wait before retry number `attempt` (1, 2, ...): doubling from first_s, capped at
    max_s, each drawn in [half, all] of it (jitter, so that callers do not retry in step)."""
    full = min(max_s, first_s * 2.0 ** (attempt - 1))
    return full * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
