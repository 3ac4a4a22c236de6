"""The ledger entry format: the contract between the node that writes a ledger and the
auditor who checks it (docs/ledger.md).

An entry's body is canonical JSON (sorted keys, compact separators, ASCII) signed with the
node's Ed25519 ledger key; each names the SHA-256 of the previous entry (body + signature),
and a signed head names the last. Both the node's SQLite ledger (node/budget/) and the
auditor's tools (coordinator/audit/) use exactly these definitions, as both sides of the gRPC
contract use the same .proto files.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from queries import spec, spec_io
from queries.errors import ConfigError
from queries.results import SecureAggregation, ShareNoise

FORMAT = 1
ENTRY_RECORD = "chc.ledger.entry"
HEAD_RECORD = "chc.ledger.head"
ZERO_HASH = "0" * 64
RELEASED = "released"
REFUSED = "refused"
# A release that is one step of a model fit records it under this key (docs/ledger.md,
# "Model fits"): the step, the fit's number of steps, the design's columns, the coefficients
# the hub sent, the regions in the hub's order, and for a design check the node refused on,
# why. Entries without it (every entry written before fits) are single queries.
FIT_FIELD = "fit"


@dataclass(frozen=True)
class FitStepRecord:
    """What a fit step's ledger entry records about the step (its `fit` field)."""

    step: int
    steps: int
    columns: tuple[str, ...]
    coefficients: tuple[float, ...]
    regions: tuple[str, ...]
    # For a design check (step 0): why this node refuses the rest of the fit, or "".
    refused: str = ""

    def fields(self) -> dict[str, Any]:
        """The JSON-ready `fit` field."""
        return {
            "step": self.step,
            "steps": self.steps,
            "columns": list(self.columns),
            "coefficients": [float(b) for b in self.coefficients],
            "regions": list(self.regions),
            "refused": self.refused,
        }


def read_fit(body: dict[str, Any]) -> FitStepRecord | None:
    """An entry's fit step, None if it has none; ValueError if the field is malformed."""
    raw = body.get(FIT_FIELD)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("its fit field is not an object")
    step, steps = raw.get("step"), raw.get("steps")
    columns, coefficients = raw.get("columns"), raw.get("coefficients")
    regions, refused = raw.get("regions"), raw.get("refused", "")
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (step, steps))
    if not whole or not isinstance(refused, str):
        raise ValueError("its fit field needs whole numbers step and steps, and refused text")
    if not (
        isinstance(columns, list)
        and all(isinstance(c, str) for c in columns)
        and isinstance(regions, list)
        and all(isinstance(r, str) for r in regions)
        and isinstance(coefficients, list)
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in coefficients)
    ):
        raise ValueError("its fit field needs lists of columns, coefficients and regions")
    return FitStepRecord(
        step=int(step),  # type: ignore[arg-type]
        steps=int(steps),  # type: ignore[arg-type]
        columns=tuple(columns),
        coefficients=tuple(float(b) for b in coefficients),
        regions=tuple(regions),
        refused=refused,
    )


# A release that is a node's masked share of a secure aggregate records how its noise share
# was sized and what it guarantees (docs/ledger.md, "Secure aggregation"): the round's k
# nodes, the threshold t of them assumed honest, the release's rho if only t are honest and
# if all k are, and per component its length, public upscale and share scale. Entries
# without it are releases with the node's full noise.
SECURE_AGGREGATION_FIELD = "secure_aggregation"


def secure_aggregation_fields(record: SecureAggregation) -> dict[str, Any]:
    """The JSON-ready `secure_aggregation` field of an entry."""
    return {
        "nodes": record.nodes,
        "threshold": record.threshold,
        "round": list(record.round),
        "rho_threshold": float(record.rho_threshold),
        "rho_all_honest": float(record.rho_all_honest),
        "components": [
            {
                "component": c.component,
                "length": c.length,
                "upscale": c.upscale,
                "share_scale": float(c.share_scale),
                "unit": float(c.unit),
                "rho": float(c.rho),
                "rho_threshold": float(c.rho_threshold),
                "rho_all_honest": float(c.rho_all_honest),
            }
            for c in record.components
        ],
    }


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _share(raw: object) -> ShareNoise:
    if not isinstance(raw, dict):
        raise ValueError("a component of its secure_aggregation field is not an object")
    name, length, upscale = raw.get("component"), raw.get("length"), raw.get("upscale")
    reals = [raw.get(k) for k in ("share_scale", "unit", "rho", "rho_threshold", "rho_all_honest")]
    if not (isinstance(name, str) and _whole(length) and _whole(upscale)):
        raise ValueError(
            "a component of its secure_aggregation field needs a name and whole numbers "
            "length and upscale"
        )
    if not all(_real(v) for v in reals):
        raise ValueError(
            f"component {name!r} of its secure_aggregation field needs numbers share_scale, "
            "unit, rho, rho_threshold and rho_all_honest"
        )
    scale, unit, rho, at_t, at_k = (float(v) for v in reals)  # type: ignore[arg-type]
    return ShareNoise(
        component=name,
        length=int(length),  # type: ignore[arg-type]
        upscale=int(upscale),  # type: ignore[arg-type]
        share_scale=scale,
        unit=unit,
        rho=rho,
        rho_threshold=at_t,
        rho_all_honest=at_k,
    )


def read_secure_aggregation(body: dict[str, Any]) -> SecureAggregation | None:
    """An entry's secure-aggregation record, None if it has none; ValueError if the field is
    malformed."""
    raw = body.get(SECURE_AGGREGATION_FIELD)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("its secure_aggregation field is not an object")
    nodes, threshold, names = raw.get("nodes"), raw.get("threshold"), raw.get("round")
    at_t, at_k, parts = raw.get("rho_threshold"), raw.get("rho_all_honest"), raw.get("components")
    if not (_whole(nodes) and _whole(threshold) and _real(at_t) and _real(at_k)):
        raise ValueError(
            "its secure_aggregation field needs whole numbers nodes and threshold and numbers "
            "rho_threshold and rho_all_honest"
        )
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError("its secure_aggregation field needs the round's node names")
    if not isinstance(parts, list):
        raise ValueError("its secure_aggregation field needs a list of components")
    return SecureAggregation(
        nodes=int(nodes),  # type: ignore[arg-type]
        threshold=int(threshold),  # type: ignore[arg-type]
        round=tuple(names),
        rho_threshold=float(at_t),  # type: ignore[arg-type]
        rho_all_honest=float(at_k),  # type: ignore[arg-type]
        components=tuple(_share(c) for c in parts),
    )


@dataclass(frozen=True)
class SignedEntry:
    """One ledger entry as stored: canonical JSON body and the node's signature over it."""

    sequence: int
    body: bytes
    signature: bytes
    # True for the signed head that ends a stream (body names the last entry and its hash).
    head: bool = False


def canonical_json(obj: object) -> bytes:
    """The one encoding of ledger bodies: sorted keys, compact, ASCII, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(body: bytes, signature: bytes) -> str:
    """What the next entry's prev_hash must be: SHA-256 of body then signature, in hex."""
    return hashlib.sha256(body + signature).hexdigest()


def format_time(when: datetime) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2025-06-01T09:30:00.123Z."""
    utc = when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Inverse of format_time."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def truncate_ms(when: datetime) -> datetime:
    """A time at the precision entries record (milliseconds)."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse an entry or head body, refusing anything but a JSON object."""
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("the body is not a JSON object")
    return parsed


def query_text(query: bytes) -> str:
    """The canonical query as text (bytes that are not UTF-8 are escaped, never dropped)."""
    return query.decode("utf-8", errors="backslashreplace")


def views_of(query: bytes) -> list[str]:
    """Best effort for refusals, whose query may not even parse: the view it names."""
    if len(query) > spec_io.MAX_SPEC_BYTES:
        return []  # refused unparsed; not worth parsing here either
    try:
        view = json.loads(query).get("view")
        return [spec.check_identifier(view, "view")]
    except (ValueError, AttributeError, RecursionError):
        return []


# ---- keys ---------------------------------------------------------------------------------


def default_key_path(ledger: Path) -> Path:
    """The ledger's signing key beside it: nwc.ledger.sqlite -> nwc.ledger.key."""
    return ledger.with_suffix(".key")


def public_key_path(key_path: Path) -> Path:
    """Where the public half is published beside the key: nwc.ledger.pub."""
    return key_path.with_suffix(".pub")


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (what Describe sends as ledger_public_key)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(path: Path) -> bytes:
    """A raw Ed25519 public key from a PEM public key, a PEM private key, or hex/base64 text."""
    data = path.read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return public_key_bytes(private)
        elif b"PUBLIC KEY" in data:
            public = serialization.load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return public.public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
        else:
            text = data.decode("ascii").strip()
            raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text)
            if len(raw) == 32:
                return raw
    except ValueError:
        pass
    raise ConfigError(
        f"{path} holds no Ed25519 public key (expected PEM, or 32 bytes as hex or base64)"
    )


def signature_ok(public_key: bytes, body: bytes, signature: bytes) -> bool:
    """Whether signature is the Ed25519 signature of body under the raw public key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, body)
    except (InvalidSignature, ValueError):
        return False
    return True
