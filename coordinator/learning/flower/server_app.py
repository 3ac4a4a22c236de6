"""The chc ServerApp (Flower Message API): bounded exchanges with the nodes, one task per run.

Flower runs this in a `flwr-serverapp` process started by the SuperLink; the FAB names it
(protocols.flower_wire.SERVER_APP) but does not carry it. The run's config says which task
to run (TASKS) and where to write its JSON result. Nothing here waits without a bound:
Flower's own `send_and_receive` polls every 3 s and its strategies wait for nodes forever.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from protocols.flower_wire import BAD_MESSAGE, KIND, MESSAGE_TYPE, PAYLOAD, RECORD
from queries.errors import ChcError, ConfigError

log = logging.getLogger("chc.hub.flower")

POLL_S = 0.2
NODES_POLL_S = 0.5
# A node's error reason is quoted in results; past this it is cut (a reason is a sentence).
MAX_REASON = 2000
# Flower wraps an exception raised in a ClientApp process (e.g. the node's FAB check) as
# "<class 'module.Name'>:<'message'>"; the message is what the node meant to say.
_WRAPPED = re.compile(r"^<class '[^']*'>:<'(.*)'>$", re.DOTALL)

app = ServerApp()


@dataclass(frozen=True)
class Reply:
    """One node's answer to one exchange: a payload, or an error code and reason."""

    node_id: int
    payload: bytes | None
    error_code: int | None  # None with no payload: no reply before the deadline
    reason: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the node answered with a payload."""
        return self.payload is not None

    def summary(self) -> dict[str, Any]:
        """A JSON-able view for results: never the payload itself, only its size."""
        if self.payload is not None:
            return {"ok": True, "seconds": self.seconds, "payload_bytes": len(self.payload)}
        return {
            "ok": False,
            "seconds": self.seconds,
            "error_code": self.error_code,
            "reason": self.reason,
        }


def run_config(context: Context) -> dict[str, str]:
    """The run's config as strings (chc FABs declare every key as a string)."""
    return {str(k): str(v) for k, v in context.run_config.items()}


def payload_of(config: Mapping[str, str]) -> bytes:
    """The run's payload: base64 bytes in run_config["payload"]."""
    try:
        return base64.b64decode(config.get("payload", ""), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("run config 'payload' is not valid base64") from None


def seconds_of(config: Mapping[str, str], key: str) -> float:
    """A positive number of seconds from run_config[key], with a clear error if it is not."""
    try:
        value = float(config[key])
    except (KeyError, ValueError):
        raise ConfigError(f"run config {key!r} must be a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"run config {key!r} must be > 0, not {value}")
    return value


def online_nodes(grid: Grid, want: int, deadline_s: float) -> list[int]:
    """Wait at most deadline_s for want nodes to be online; return those online (sorted)."""
    deadline = time.monotonic() + deadline_s
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= want or time.monotonic() >= deadline:
            return ids
        time.sleep(NODES_POLL_S)


def exchange(
    grid: Grid,
    contents: Mapping[int, bytes],
    kind: str,
    deadline_s: float,
    *,
    poll_s: float = POLL_S,
) -> dict[int, Reply]:
    """Send each node its bytes as a `kind` message; collect replies until the deadline.

    Every node in contents gets a Reply: its payload, its error (including the SuperLink's
    "node unavailable" for a node that stopped heartbeating, which arrives from the
    SuperLink, not the node, and is matched by the message it answers), or "no reply".
    """
    started = time.monotonic()
    nodes = list(contents)
    messages = [
        Message(
            RecordDict({RECORD: ConfigRecord({KIND: kind, PAYLOAD: contents[nid]})}),
            dst_node_id=nid,
            message_type=MESSAGE_TYPE,
            # A node that picks the message up after the deadline would work for nothing.
            ttl=max(deadline_s, 1.0),
        )
        for nid in nodes
    ]
    pushed = list(grid.push_messages(messages))
    replies: dict[int, Reply] = {}
    by_message: dict[str, int] = {}
    for nid, mid in zip(nodes, pushed, strict=False):
        if mid:
            by_message[mid] = nid
        else:
            replies[nid] = Reply(nid, None, None, "the SuperLink did not accept the message", 0.0)
    for nid in nodes[len(pushed) :]:
        replies[nid] = Reply(nid, None, None, "the SuperLink did not accept the message", 0.0)
    pending = set(by_message)
    deadline = started + deadline_s
    while pending:
        for message in grid.pull_messages(list(pending)):
            mid = message.metadata.reply_to_message_id
            if mid not in pending:
                continue
            pending.discard(mid)
            nid = by_message[mid]
            replies[nid] = _reply(nid, message, round(time.monotonic() - started, 3))
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    for mid in pending:
        nid = by_message[mid]
        replies[nid] = Reply(nid, None, None, f"no reply within {deadline_s:g} s", deadline_s)
    return replies


def _reply(node_id: int, message: Message, seconds: float) -> Reply:
    if message.has_error():
        error = message.error
        reason = error.reason or ""
        wrapped = _WRAPPED.match(reason)
        reason = wrapped.group(1) if wrapped else reason
        return Reply(node_id, None, int(error.code), reason[:MAX_REASON], seconds)
    record = message.content.config_records.get(RECORD)
    payload = record.get(PAYLOAD) if record is not None else None
    if not isinstance(payload, bytes):
        return Reply(node_id, None, BAD_MESSAGE, "the reply carries no chc payload", seconds)
    return Reply(node_id, payload, None, "", seconds)


# ---- tasks --------------------------------------------------------------------------------

Task = Callable[[Grid, Context], dict[str, Any]]


def ping(grid: Grid, context: Context) -> dict[str, Any]:
    """Ask every online node for its name and its verdict on the FAB."""
    config = run_config(context)
    want = int(config.get("min-nodes", "1"))
    nodes = online_nodes(grid, want, seconds_of(config, "nodes-deadline-s"))
    started = time.monotonic()
    replies = exchange(grid, dict.fromkeys(nodes, b""), "ping", seconds_of(config, "deadline-s"))
    wall = round(time.monotonic() - started, 3)
    per_node: dict[str, dict[str, Any]] = {}
    for nid, reply in sorted(replies.items()):
        entry = reply.summary()
        if reply.payload is not None:
            try:
                answer = json.loads(reply.payload)
            except (UnicodeDecodeError, json.JSONDecodeError):
                answer = {}
            entry["name"] = str(answer.get("node", ""))
            entry["fab_check"] = str(answer.get("fab_check", ""))
        per_node[str(nid)] = entry
    return {
        "nodes": nodes,
        "replies": per_node,
        "exchanges": [{"kind": "ping", "wall_s": wall, "sent": len(nodes)}],
    }


TASKS: dict[str, Task] = {"ping": ping}


def tasks() -> dict[str, Task]:
    """TASKS and "train" (coordinator/learning/flower/train.py, which builds on this module,
    so it is imported here, when a run starts, rather than at the top)."""
    from coordinator.learning.flower import train

    return {**TASKS, "train": train.train}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the task the run's config names and write its JSON result to config["output"]."""
    config = run_config(context)
    task = config.get("task", "ping")
    started = time.monotonic()
    result: dict[str, Any] = {"task": task}
    try:
        table = tasks()
        if task not in table:
            raise ConfigError(f"unknown task {task!r}; known: {sorted(table)}")
        result.update(table[task](grid, context))
        result["ok"] = True
    except ChcError as exc:
        result.update(ok=False, error=str(exc))
        log.warning("task %s refused: %s", task, exc)
    except Exception:
        ref = secrets.token_hex(4)
        log.exception("task %s failed (ref %s)", task, ref)
        result.update(ok=False, error=f"internal error (ref {ref})")
    result["wall_s"] = round(time.monotonic() - started, 3)
    result["finished"] = True
    output = config.get("output", "")
    if output:
        _write_json(Path(output), result)
    log.info("task %s done in %.2f s (ok=%s)", task, result["wall_s"], result["ok"])


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically, so a reader polling for the file never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)
