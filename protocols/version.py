"""The wire protocol's version, and what a node or hub does with a peer speaking another.

Versions are MAJOR.MINOR. A minor version only adds (fields, methods, values) that a peer of
an earlier minor ignores safely or is never sent; a major version breaks. So:

- the same major: every call goes ahead; a party uses what the other's minor offers and no
  more (the hub sends a fetch-only re-send, `ExecuteRequest.kept_only`, only to nodes of
  1.1 or later, because a 1.0 node would not know the field and would run the query);
- another major: refused before anything else, with both versions in the message.

Each side says its version: a node in DescribeResponse.protocol_version (which 1.0 nodes
fill with "chc.v1"), and every caller in the `chc-protocol` request metadata, which nodes
and the hub check on every call (protocols/rpc.guarded). A caller that sends none is taken
as 1.0 (the clients of 1.0 sent none).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from queries.errors import ChcError

# The request metadata key that carries the caller's protocol version.
HEADER = "chc-protocol"

_TEXT = re.compile(r"chc\.v(\d{1,4})(?:\.(\d{1,4}))?")


class ProtocolMismatchError(ChcError):
    """The other party speaks a major version of the protocol this one does not."""

    status_name = "FAILED_PRECONDITION"


@dataclass(frozen=True, order=True)
class ProtocolVersion:
    """A protocol version, MAJOR.MINOR; written chc.vMAJOR.MINOR on the wire."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"chc.v{self.major}.{self.minor}"

    @classmethod
    def parse(cls, text: str) -> ProtocolVersion:
        """A version from its wire text ("chc.v1" is 1.0, as nodes of 1.0 wrote it)."""
        found = _TEXT.fullmatch(text.strip())
        if found is None:
            raise ProtocolMismatchError(
                f"protocol version {text[:40]!r} is not of the form chc.vMAJOR.MINOR"
            )
        return cls(int(found.group(1)), int(found.group(2) or 0))

    def supports(self, feature: ProtocolVersion) -> bool:
        """Whether a peer at this version has what `feature`'s version added."""
        return self.major == feature.major and self.minor >= feature.minor


# 1.0: everything up to the fetch-only re-send (operation-bound envelopes, kept releases
#      and `resent`, fit steps, the ledger stream).
# 1.1: ExecuteRequest.kept_only and NodeOutcome.charge_unknown; the `chc-protocol` header.
# 1.2: secure aggregation (Node.SecAggAnnounce and SecAggShare, pooled_only queries, the
#      secure-aggregation fields of ExplainResponse and SubmitResponse).
# 1.3: flow control of streams over a node's link (HubFrame.credit): a node of 1.3 sends a
#      streaming call's messages only as the hub grants credit for them; a fit step is
#      idempotent (the same FitStepRequest again gets the release kept for it, `resent`).
CURRENT = ProtocolVersion(1, 3)
KEPT_ONLY = ProtocolVersion(1, 1)
SECURE_AGGREGATION = ProtocolVersion(1, 2)
FLOW_CONTROL = ProtocolVersion(1, 3)
FIRST = ProtocolVersion(1, 0)


def check_compatible(theirs: ProtocolVersion, *, them: str, us: str) -> None:
    """Refuse a peer of another major version, naming both versions and what to do."""
    if theirs.major != CURRENT.major:
        older = us if theirs > CURRENT else them
        raise ProtocolMismatchError(
            f"{them} speaks chc protocol {theirs} and {us} speaks {CURRENT}: a new major "
            f"version breaks compatibility, so the call is refused (nothing was run or "
            f"charged); upgrade {older} to chc protocol {max(theirs, CURRENT)} "
            f"(docs/deployment.md, 'Upgrading')"
        )


def caller_version(metadata: Sequence[tuple[str, str | bytes]] | None) -> ProtocolVersion:
    """The caller's version from its request metadata (FIRST when it sends none)."""
    for key, value in metadata or ():
        if key == HEADER:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return ProtocolVersion.parse(text)
    return FIRST


def metadata() -> tuple[tuple[str, str], ...]:
    """The request metadata a caller sends: its protocol version."""
    return ((HEADER, str(CURRENT)),)
