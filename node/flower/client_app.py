"""The chc ClientApp (Flower Message API): one dispatcher over a table of handlers by kind.

Flower runs this in a `flwr-clientapp` process per message (through the node's FAB check,
node/flower/verified_clientapp.py). Every chc message is a "query" message whose record
names its kind (protocols.flower_wire); a handler gets the payload bytes and the SuperNode's
node_config and returns the reply's bytes. What a node refuses travels back as an Error
reply with the ChcError's message; anything else as "internal error (ref ...)", logged here
with the reference, so no traceback or value of the node's data leaves the node.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from node.flower.fab_policy import recorded_verdict
from protocols.flower_wire import BAD_MESSAGE, INTERNAL, KIND, PAYLOAD, RECORD, REFUSED
from queries.errors import ChcError

log = logging.getLogger("chc.node.flower")

Handler = Callable[[bytes, Mapping[str, str]], bytes]

app = ClientApp()


def ping(payload: bytes, node_config: Mapping[str, str]) -> bytes:
    """Answer with the node's name and this process's verdict on the FAB."""
    del payload
    answer = {"node": node_config.get("node-name", ""), "fab_check": recorded_verdict()}
    return json.dumps(answer).encode()


HANDLERS: dict[str, Handler] = {"ping": ping}


def handlers() -> dict[str, Handler]:
    """HANDLERS plus those of node/flower/relay.py (its HANDLERS dict), when it exists."""
    table = dict(HANDLERS)
    try:
        from node.flower import relay  # type: ignore[attr-defined, unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name != "node.flower.relay":
            raise
        return table
    table.update(getattr(relay, "HANDLERS", {}))
    return table


def _error(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


@app.query()
def dispatch(message: Message, context: Context) -> Message:
    """Route a chc message to its kind's handler and wrap its answer or refusal."""
    record = message.content.config_records.get(RECORD)
    kind = record.get(KIND) if record is not None else None
    payload = record.get(PAYLOAD) if record is not None else None
    if not isinstance(kind, str) or not isinstance(payload, bytes):
        return _error(message, BAD_MESSAGE, "the message carries no chc kind and payload")
    handler = handlers().get(kind)
    if handler is None:
        return _error(message, BAD_MESSAGE, f"this node has no handler for {kind[:40]!r}")
    node_config = {str(k): str(v) for k, v in context.node_config.items()}
    try:
        answer = handler(payload, node_config)
    except ChcError as exc:
        log.warning("%s refused: %s", kind, exc)
        return _error(message, REFUSED, str(exc))
    except Exception:
        ref = secrets.token_hex(4)
        log.exception("%s failed (ref %s)", kind, ref)
        return _error(message, INTERNAL, f"internal error (ref {ref})")
    return Message(RecordDict({RECORD: ConfigRecord({PAYLOAD: answer})}), reply_to=message)
