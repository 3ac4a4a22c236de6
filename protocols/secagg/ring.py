"""Vectors of 64-bit integers in the ring Z_2^64, where pairwise masks cancel.

Components are int64 (mechanisms.INTEGER_TYPE); in the ring they are numpy uint64 in two's
complement, whose addition wraps modulo 2^64 by construction. A sum decodes exactly when the
true (signed) sum lies in [-2^63, 2^63): `fits` checks that from public bounds, before any
node touches its data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from queries import distributed_noise
from queries.errors import QueryError

RingVector = npt.NDArray[np.uint64]
MODULUS = 2**distributed_noise.RING_BITS
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def encode(values: Sequence[int]) -> RingVector:
    """int64 values as ring elements (two's complement); refuse a value outside int64."""
    for i, v in enumerate(values):
        if not _INT64_MIN <= int(v) <= _INT64_MAX:
            raise QueryError(f"value {i} ({v}) is outside the 64-bit range the ring encodes")
    return np.asarray([int(v) for v in values], dtype=np.int64).view(np.uint64)


def decode(vector: RingVector) -> list[int]:
    """Ring elements back to signed integers (two's complement)."""
    return [int(v) for v in np.asarray(vector, dtype=np.uint64).view(np.int64)]


def add(a: RingVector, b: RingVector) -> RingVector:
    """a + b modulo 2^64, elementwise."""
    out: RingVector = np.add(a, b, dtype=np.uint64)
    return out


def subtract(a: RingVector, b: RingVector) -> RingVector:
    """a - b modulo 2^64, elementwise."""
    out: RingVector = np.subtract(a, b, dtype=np.uint64)
    return out


def total(vectors: Sequence[RingVector]) -> RingVector:
    """The sum modulo 2^64 of vectors of one length; refuse ragged or non-uint64 input."""
    if not vectors:
        raise QueryError("there are no vectors to sum")
    n = len(vectors[0])
    for i, v in enumerate(vectors):
        if v.dtype != np.uint64 or v.ndim != 1 or len(v) != n:
            raise QueryError(
                f"vector {i} is not a 1-d uint64 vector of length {n} (dtype {v.dtype}, "
                f"shape {v.shape}); every node must send the same number of components"
            )
    out: RingVector = np.sum(np.stack(vectors), axis=0, dtype=np.uint64)
    return out


def fits(max_abs_per_node: float, k: int, share_scale: float = 0.0) -> bool:
    """Whether the sum of k nodes' values (each |v| <= max_abs_per_node) plus noise cannot wrap.

    share_scale is each node's noise share sigma (queries.distributed_noise); the bound uses
    mechanisms' 40-sigma tail, exceeded with probability below exp(-800) per share.
    """
    return distributed_noise.ring_fits(max_abs_per_node, k, share_scale)
