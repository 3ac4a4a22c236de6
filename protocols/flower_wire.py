"""What the hub's ServerApp and a node's ClientApp agree on inside a Flower message.

Both sides of a chc Flower run import this module (the hub and the node may not import each
other): the record and field names that carry a payload, the message type, the app
components a FAB may name, and the error codes a node's reply can carry.
"""

from __future__ import annotations

# Every chc message is a Flower "query" message; the chc kind ("ping", "train", ...) travels
# in the record, so a node's ClientApp needs no Flower registration per kind.
MESSAGE_TYPE = "query"
RECORD = "chc"
KIND = "kind"
PAYLOAD = "payload"

# The only components a chc FAB may name: both are installed with chc, none ships in the FAB.
SERVER_APP = "coordinator.learning.flower.server_app:app"
CLIENT_APP = "node.flower.client_app:app"

# Error codes of a node's reply. Flower's own are 0-8 (flwr.common.constant.ErrorCode): 2 is
# "the ClientApp raised", which is how a FAB refused by the node's check arrives, and 5 is
# "node unavailable", made up by the SuperLink for a node that stopped heartbeating.
REFUSED = 1001  # a ChcError: the node refused, its message says why
INTERNAL = 1002  # anything else; the node logged it under the reference in the message
BAD_MESSAGE = 1003  # no chc record, or a kind the node has no handler for
