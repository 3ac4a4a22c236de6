"""Where an auditor reads a ledger from: a node's SQLite file, an export, or the node itself.

A ledger can be read from a node's SQLite file, from an export (JSON Lines or Parquet), or
from each node directly over mutual TLS with an auditor certificate. The hub tells an
auditor where the nodes are; only an outbound-only node, which no one can connect to, is read
through the hub, which relays the node's own signed stream unchanged (open_relayed).
Every source yields the same `LedgerSource` (entries in stored order, then the head), so
verifying, exporting and reporting never care where a ledger came from; that is why reading
lives apart from them.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow.parquet as pq

from protocols.ledger.entry import (
    SignedEntry,
    default_key_path,
    load_public_key,
    public_key_path,
)
from protocols.ledger.file import is_sqlite_file, read_ledger_file, read_meta
from protocols.link_frames import check_certificate, check_signature, ledger_key_payload
from protocols.security.pki import Identity, Role
from protocols.security.tls import secure_channel
from protocols.v1 import link_pb2, link_pb2_grpc, node_pb2, node_pb2_grpc
from queries.errors import ChcError

EXPORT_MAGIC = "chc_ledger"
PARQUET_MAGIC = b"PAR1"


class AuditError(RuntimeError, ChcError):
    """A ledger could not be read (the node, file or export is unavailable or malformed)."""


@dataclass(frozen=True)
class LedgerSource:
    """One node's ledger as an auditor reads it: entries in stored order, then the head."""

    label: str  # a path, or node@address
    node: str  # "" when the source does not say
    public_key: bytes | None
    key_origin: str  # where the public key came from, for the report
    read: Callable[[], Iterator[SignedEntry]]


def _sqlite_source(path: Path, public_key: bytes | None, key_origin: str) -> LedgerSource:
    meta = read_meta(path)
    if public_key is None:
        key_file = default_key_path(path)
        for candidate in (public_key_path(key_file), key_file):
            if candidate.is_file():
                public_key, key_origin = load_public_key(candidate), str(candidate)
                break
    if public_key is None and "public_key" in meta:
        public_key = bytes.fromhex(meta["public_key"])
        key_origin = "the ledger's own meta table (proves self-consistency only; give --public-key)"
    return LedgerSource(
        label=str(path),
        node=meta.get("node", ""),
        public_key=public_key,
        key_origin=key_origin,
        read=lambda: read_ledger_file(path),
    )


def _entry_from_json(obj: dict[str, Any], *, head: bool = False) -> SignedEntry:
    if "body_b64" in obj:
        body = base64.b64decode(obj["body_b64"])
    else:
        body = str(obj["body"]).encode("utf-8")
    return SignedEntry(
        sequence=int(obj["sequence"]),
        body=body,
        signature=base64.b64decode(obj["signature"]),
        head=head,
    )


def _jsonl_header(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        header = json.loads(first)[EXPORT_MAGIC]
    except (ValueError, KeyError, TypeError):
        raise AuditError(
            f"{path} is neither a ledger (SQLite), a Parquet export nor a JSON Lines export "
            "written by `chc audit export`"
        ) from None
    if not isinstance(header, dict):
        raise AuditError(f"{path}: malformed export header")
    return header


def _read_jsonl(path: Path) -> Iterator[SignedEntry]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number == 1 or not line.strip():
                continue
            try:
                obj = json.loads(line)
                if "head" in obj:
                    yield _entry_from_json(obj["head"], head=True)
                else:
                    yield _entry_from_json(obj)
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditError(
                    f"{path}, line {number}: not a ledger export line ({exc})"
                ) from None


def _parquet_header(path: Path) -> dict[str, Any]:
    meta = pq.read_metadata(path).metadata or {}
    raw = meta.get(EXPORT_MAGIC.encode())
    if raw is None:
        raise AuditError(f"{path} is a Parquet file but not a chc ledger export")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise AuditError(f"{path}: malformed export metadata")
    return header


def _read_parquet(path: Path) -> Iterator[SignedEntry]:
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(columns=["sequence", "body", "signature"]):
        for row in batch.to_pylist():
            yield SignedEntry(
                sequence=int(row["sequence"]),
                body=bytes(row["body"]),
                signature=bytes(row["signature"]),
            )
    head = _parquet_header(path).get("head")
    if isinstance(head, dict):
        yield _entry_from_json(head, head=True)


def open_file(path: Path, *, public_key: bytes | None = None) -> LedgerSource:
    """A ledger file (SQLite) or an export (JSON Lines or Parquet), recognised by content.

    The key that checks signatures is, in order: the one given; for a ledger file, the
    `.pub` (or `.key`) file beside it; for an export, the key recorded when it was made.
    """
    if not path.is_file():
        raise AuditError(f"{path} does not exist or is not a file")
    origin = "given" if public_key is not None else ""
    if is_sqlite_file(path):
        return _sqlite_source(path, public_key, origin)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == PARQUET_MAGIC:
        header, reader = _parquet_header(path), _read_parquet
    else:
        header, reader = _jsonl_header(path), _read_jsonl
    if public_key is None and header.get("public_key"):
        public_key = bytes.fromhex(str(header["public_key"]))
        origin = f"the export header ({header.get('key_origin', 'unknown origin')})"
    return LedgerSource(
        label=str(path),
        node=str(header.get("node", "")),
        public_key=public_key,
        key_origin=origin,
        read=lambda: reader(path),
    )


def _rpc_error(exc: grpc.RpcError, what: str) -> AuditError:
    call = exc if isinstance(exc, grpc.Call) else None
    code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    details = (call.details() if call is not None else None) or code.name
    return AuditError(f"{what}: {code.name}: {details}")


def open_remote(
    node: str, address: str, identity: Identity, *, timeout_s: float = 600.0
) -> LedgerSource:
    """A node's ledger read from the node itself over mutual TLS (auditor certificate).

    The node's TLS certificate must carry `node` as its name, so another party cannot answer
    for it; its ledger key comes from its own Describe over the same authenticated channel.
    """
    channel = secure_channel(address, identity, server_name=node)
    stub = node_pb2_grpc.NodeStub(channel)
    try:
        described = stub.Describe(node_pb2.DescribeRequest(), timeout=30.0)
    except grpc.RpcError as exc:
        channel.close()
        raise _rpc_error(exc, f"cannot describe node {node} at {address}") from None
    public_key = bytes(described.ledger_public_key) or None

    def read() -> Iterator[SignedEntry]:
        try:
            for e in stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=timeout_s):
                yield SignedEntry(e.sequence, bytes(e.body), bytes(e.signature), head=e.head)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, f"cannot read the ledger of node {node} at {address}") from None

    return LedgerSource(
        label=f"{node}@{address}",
        node=described.node or node,
        public_key=public_key,
        key_origin=f"node {node}'s Describe over mutual TLS",
        read=read,
    )


def open_relayed(
    node: str,
    hub: str,
    identity: Identity,
    *,
    hub_name: str = "hub",
    timeout_s: float = 600.0,
) -> LedgerSource:
    """An outbound-only node's ledger, read through the hub's relay (docs/outbound.md).

    The hub passes the node's own StreamLedger frames on unchanged, and the ledger key comes
    in a statement the node signs with its certificate key for a fresh challenge of ours, so
    the hub can neither forge nor alter entries undetected, nor substitute a key of its own:
    verification is end to end, exactly as for a ledger read from the node itself.
    """
    channel = secure_channel(hub, identity, server_name=hub_name)
    stub = link_pb2_grpc.LedgerRelayStub(channel)
    challenge = os.urandom(32)
    where = f"node {node} through the hub at {hub}"
    try:
        statement = stub.NodeLedgerKey(
            link_pb2.NodeLedgerRequest(node=node, challenge=challenge), timeout=30.0
        )
    except grpc.RpcError as exc:
        channel.close()
        raise _rpc_error(exc, f"cannot read the ledger key of {where}") from None
    try:
        signer = check_certificate(
            statement.node_certificate,
            identity.ca_pem,
            role=Role.NODE,
            name=node,
            what="the certificate on the ledger key statement",
        )
        check_signature(
            signer,
            statement.signature,
            ledger_key_payload(node, statement.ledger_public_key, challenge),
            "the ledger key statement",
        )
    except ChcError as exc:
        channel.close()
        raise AuditError(f"{where}: the ledger key does not verify ({exc})") from None

    def read() -> Iterator[SignedEntry]:
        request = link_pb2.NodeLedgerRequest(node=node, from_sequence=1)
        try:
            for e in stub.StreamNodeLedger(request, timeout=timeout_s):
                yield SignedEntry(e.sequence, bytes(e.body), bytes(e.signature), head=e.head)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, f"cannot read the ledger of {where}") from None

    return LedgerSource(
        label=f"{node}@{hub} (relayed)",
        node=statement.node or node,
        public_key=bytes(statement.ledger_public_key) or None,
        key_origin=f"node {node}'s statement, signed by the node's certificate for this audit",
        read=read,
    )


def node_addresses(hub: str, identity: Identity, *, timeout_s: float = 30.0) -> dict[str, str]:
    """Every node's address as the hub knows it (the auditor then connects to each)."""
    from coordinator.analyst.client import (
        Federation,  # the analysts' client, also fine for auditors
    )

    with Federation(hub, identity) as fed:
        return fed.addresses(timeout_s=timeout_s)
