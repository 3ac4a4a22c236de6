"""Federated results and explanations as data frames: Arrow first, pandas and polars on demand.

The Arrow table is the one built here; `to_pandas` and `to_polars` convert it, so the three
agree column by column. pandas and polars are optional (the `notebook` extra) and imported
only when asked for, so that nodes and the hub never load them.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from queries.combine import POOLED
from queries.errors import ChcError
from queries.results import NodeStatus

if TYPE_CHECKING:
    from queries.results import Explanation, FederatedResult

# What a pooled row's node_status says when some node did not answer.
PARTIAL_STATUS = "partial"

# The frame's columns after the result table's own (region, groups, measure, ...).
_ADDED = (
    ("node_status", pa.string()),
    ("rho_spent", pa.float64()),
)

EXPLAIN_SCHEMA = pa.schema(
    [
        ("node", pa.string()),
        ("status", pa.string()),
        ("message", pa.string()),
        ("cells", pa.int64()),
        ("rho", pa.float64()),
        ("epsilon", pa.float64()),
        ("rho_remaining", pa.float64()),
        ("measure", pa.string()),
        ("statistic", pa.string()),
        ("mechanism", pa.string()),
        ("measure_rho", pa.float64()),
        ("sensitivity", pa.float64()),
        ("noise_sd", pa.float64()),
        # A pooled_only query: the pooled sum's noise sd under secure aggregation (else null).
        ("secure_noise_sd", pa.float64()),
    ]
)


class MissingExtraError(ImportError, ChcError):
    """A data-frame library the call needs is not installed."""

    status_name = "FAILED_PRECONDITION"


def _library(name: str) -> Any:
    """Import pandas or polars, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingExtraError(
            f"{name} is not installed: install chc's notebook extra "
            f'(pip install "chc[notebook]") or {name} itself, or use to_arrow()'
        ) from None


def result_arrow(result: FederatedResult) -> pa.Table:
    """One row per region, group, measure (and histogram bin), with flags and status.

    Columns: the result table's (region, group columns, measure, statistic, bin_lower,
    bin_upper, estimate, std_error, ci_low, ci_high, n, approximate, partial, suppressed), then
    node_status and rho_spent. `suppressed` is the release rules' flag (a suppressed or
    withheld cell has a null estimate); `partial` is set on every row of a result that misses
    a node, and on pooled rows that pool fewer nodes than answered (a node withheld the cell).
    node_status is the status of the node behind a region's row; for the pooled row "ok" when
    every node answered, else "partial". rho_spent is what that node charged; for the pooled
    row, the sum over the nodes, or null when a node's charge is unknown (it timed out).
    """
    table = result.table
    regions = table.column("region") if "region" in table.column_names else None
    status = {o.node: o.status.value for o in result.nodes}
    charged = {o.node: o.rho_charged for o in result.nodes}
    everyone = all(o.status is NodeStatus.OK for o in result.nodes)
    pooled_status = NodeStatus.OK.value if everyone and not result.partial else PARTIAL_STATUS
    names = regions.to_pylist() if regions is not None else []
    node_status = [
        pooled_status if r == POOLED else status.get(str(r), NodeStatus.ERROR.value) for r in names
    ]
    # A node that timed out may or may not have charged: the pooled total is then unknown.
    unknown = any(o.charge_unknown for o in result.nodes)
    total = None if unknown else math.fsum(charged.values())
    rho = [total if r == POOLED else charged.get(str(r), 0.0) for r in names]
    rows = table.num_rows
    if "partial" in table.column_names:
        partial = pc.or_(pc.fill_null(table.column("partial"), False), pa.scalar(result.partial))
    else:
        partial = pa.chunked_array([pa.array([result.partial] * rows, pa.bool_())])
    if "suppressed" in table.column_names:
        suppressed = pc.fill_null(table.column("suppressed"), False)
    else:  # a withheld or suppressed figure is null
        suppressed = pc.is_null(table.column("estimate"))
    out = table.drop_columns([c for c in ("partial", "suppressed") if c in table.column_names])
    out = out.append_column("partial", partial).append_column("suppressed", suppressed)
    for (name, dtype), values in zip(_ADDED, (node_status, rho), strict=True):
        out = out.append_column(pa.field(name, dtype), pa.array(values, dtype))
    return out


def explanation_arrow(explanation: Explanation) -> pa.Table:
    """One row per node and measure (one row for a node that could not plan the query).

    noise_sd is the standard deviation of the noise on that measure's released values, with
    the node's full noise; for a pooled_only query, secure_noise_sd is that of the pooled sum
    under secure aggregation (null for other queries).
    """
    rows: list[dict[str, Any]] = []
    for e in explanation:
        secure = {m.measure: m.noise.variance for m in e.secure_measures}
        node = {
            "node": e.node,
            "status": e.status.value,
            "message": e.message,
            "cells": e.cells,
            "rho": e.rho,
            "epsilon": e.epsilon,
            "rho_remaining": e.budget.rho_remaining if e.budget is not None else None,
        }
        if not e.measures:
            rows.append(node)
        for m in e.measures:
            rows.append(
                node
                | {
                    "measure": m.measure,
                    "statistic": m.statistic,
                    "mechanism": m.noise.mechanism,
                    "measure_rho": m.rho,
                    "sensitivity": m.noise.sensitivity,
                    "noise_sd": _sd(m.noise.variance),
                    "secure_noise_sd": _sd(secure.get(m.measure)),
                }
            )
    return pa.Table.from_pylist(rows, schema=EXPLAIN_SCHEMA)


def _sd(variance: float | None) -> float | None:
    """A noise variance's standard deviation; None for none or a negative (unknown) one."""
    return math.sqrt(variance) if variance is not None and variance >= 0 else None


def to_pandas(table: pa.Table) -> Any:
    """The Arrow table as a pandas DataFrame (pandas from the notebook extra)."""
    _library("pandas")
    return table.to_pandas()


def to_polars(table: pa.Table) -> Any:
    """The Arrow table as a polars DataFrame (polars from the notebook extra)."""
    polars = _library("polars")
    return polars.from_arrow(table)
