"""`chc query` and `chc nodes`: the analyst's commands, and reading a query spec file safely.

The top-level app (coordinator/cli.py) registers these commands. They are kept here, with
the hub connection they share and the reading of `--spec FILE`, because that reading is
the analyst-facing half of the spec's defences: a spec may be any file the analyst can
read, so it is read with a size cap and its errors quote field names only, never its text.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Annotated

import typer

from coordinator.analyst import connect, report
from coordinator.analyst.client import Federation, load_envelope, save_envelope
from coordinator.hub.service import MAX_DEADLINE_MS
from protocols.cli import (
    AnalystIdentityOpt,
    CommandFailedError,
    ExitCode,
    HubOpt,
    JsonOpt,
    read_capped,
    read_identity,
)
from protocols.cli import console as console_for_output
from queries import spec, spec_io
from queries.errors import ConfigError, QueryError
from queries.numbers import show_apart
from queries.results import FederatedResult
from queries.sql import parse_sql

# A query spec is a few lines; reading stops one byte past this, so `--spec /dev/zero` or a
# FIFO that never ends costs a megabyte, not the machine's memory (README, "Command line").
# The spec parser's own limit: a query spec is a few lines of YAML or JSON.
MAX_SPEC_BYTES = spec_io.MAX_SPEC_BYTES
# Fields of a query spec: those of the canonical form, the query's optional fields (absent
# from a default query's canonical form, e.g. rows_per_person), and the budget as (epsilon,
# delta).
SPEC_FIELDS = (
    frozenset(spec.Query(view="persons", rho=1.0).to_dict())
    | {f.name for f in dataclasses.fields(spec.Query)}
    | {"epsilon", "delta"}
)
# Longest error about a spec file, and longest field name quoted in it: a spec may be any
# file the analyst can read, and its text must not come back in the error.
_MAX_SPEC_ERROR = 400
_MAX_FIELD_NAME = 24
# A string of the spec that is a name (view, column, statistic) may be quoted back.
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _connect(hub: str | None, identity: Path | None) -> Federation:
    """The hub and identity of --hub and --identity, else CHC_HUB / CHC_IDENTITY, else the
    running demo's (coordinator/analyst/connect.py, shared with Federation.connect)."""
    target = connect.resolve(hub, identity, spelling=connect.CLI)
    flag = {"given": "--identity"}.get(target.identity_from, target.identity_from)
    return Federation(target.hub, read_identity(target.identity, flag=flag))


def _deadline(seconds: float) -> float:
    """--deadline, checked: the hub takes whole milliseconds, up to its maximum."""
    longest = MAX_DEADLINE_MS / 1000
    # Below a millisecond the request would say 0, which the hub reads as "its default".
    if not (math.isfinite(seconds) and 0.001 <= seconds <= longest):
        raise ConfigError(
            f"--deadline {seconds:g} is out of range: give the seconds to wait for the nodes, "
            f"from 0.001 to {longest:g} (the hub's maximum)"
        )
    return seconds


def _read_spec(path: Path) -> object:
    """The parsed YAML or JSON of --spec FILE: at most MAX_SPEC_BYTES, strict UTF-8."""
    raw = read_capped(
        path, MAX_SPEC_BYTES, flag="--spec", too_large="a query spec is a few lines of YAML or JSON"
    )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--spec {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    try:
        # The spec module's loader: no YAML anchors or aliases, bounded size and depth.
        return spec_io.load_yaml(text)
    except QueryError as exc:
        raise ConfigError(f"--spec {path}: {exc}") from None


def _strings(data: object) -> tuple[set[str], set[str]]:
    """The field names and the string values in a parsed spec.

    Each object is visited once, so YAML aliases cannot make the walk longer than the file
    (at most MAX_SPEC_BYTES) is.
    """
    keys: set[str] = set()
    values: set[str] = set()
    seen: set[int] = set()
    stack = [data]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            keys.update(str(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            values.add(item)
    return keys, values


def _field_name(name: str) -> str:
    """A field name as an error quotes it: shortened, control characters escaped by repr."""
    return name if len(name) <= _MAX_FIELD_NAME else name[: _MAX_FIELD_NAME - 1] + "…"


def _spec_error(path: Path, message: str, data: object) -> str:
    """An error about a spec file that quotes its field names (shortened) and names only.

    spec.py quotes what it refuses with repr(); any other string from the file, which may be
    a system file's lines, is replaced by '…'.
    """
    keys, values = _strings(data)
    for text in sorted(keys | values, key=len, reverse=True):
        if _NAME.fullmatch(text):
            continue
        shown = _field_name(text) if text in keys else "…"
        message = message.replace(repr(text), repr(shown))
        if len(text) >= 8:
            message = message.replace(text, shown)
    message = f"--spec {path}: {message}"
    if len(message) > _MAX_SPEC_ERROR:
        message = message[: _MAX_SPEC_ERROR - 1] + "…"
    return message


def _spec_query(path: Path, data: object, budget: float | None) -> spec.Query:
    """The Query of a parsed spec file; errors quote its field names only."""
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {type(data).__name__}"
        raise QueryError(
            f"--spec {path} holds {kind}, not a query spec: a mapping with at least view and rho"
        )
    unknown = sorted(str(k) for k in data if k not in SPEC_FIELDS)
    if unknown:
        shown = ", ".join(repr(_field_name(k)) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise QueryError(
            f"--spec {path}: unknown field(s) {shown}{more}; a query spec has "
            + ", ".join(sorted(SPEC_FIELDS))
        )
    if budget is not None:
        data = {k: v for k, v in data.items() if k not in {"rho", "epsilon", "delta"}}
        data["rho"] = budget
    try:
        return spec_io.from_dict(data)
    except QueryError as exc:
        raise QueryError(_spec_error(path, str(exc), data)) from None
    except RecursionError:
        raise QueryError(f"--spec {path} is nested too deeply") from None


def _budget(rho: float | None, epsilon: float | None, delta: float) -> float:
    if rho is not None and epsilon is not None:
        raise ConfigError("give --rho or --epsilon, not both")
    if epsilon is not None:
        low, high = spec.DELTA_RANGE
        if not (math.isfinite(delta) and low <= delta <= high):
            # A usage error (exit 2), not a refused query: delta only converts --epsilon to
            # rho here and is never sent to a node.
            given, lo, hi = show_apart(delta, low, high)
            raise ConfigError(
                f"--delta must be between {lo} and {hi} (it converts --epsilon to rho), got {given}"
            )
        return spec.rho_from_epsilon(epsilon, delta)
    if rho is None:
        raise ConfigError("give the privacy budget per node: --rho R (zCDP) or --epsilon E")
    return rho


def _build_query(
    sql_text: str | None,
    spec_file: Path | None,
    view: str | None,
    group_by: list[str] | None,
    where: list[str] | None,
    rho: float | None,
    epsilon: float | None,
    delta: float,
) -> spec.Query:
    chosen = [x for x in (sql_text, spec_file, view) if x is not None]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --sql, --spec FILE or --view")
    if spec_file is not None:
        data = _read_spec(spec_file)
        given = rho is not None or epsilon is not None
        return _spec_query(spec_file, data, _budget(rho, epsilon, delta) if given else None)
    budget = _budget(rho, epsilon, delta)
    if sql_text is not None:
        try:
            return parse_sql(sql_text, rho=budget)
        except RecursionError:  # queries/sql.py bounds the nesting; this is the backstop
            raise QueryError("--sql is nested too deeply") from None
    filters = []
    for w in where or []:
        column, sep, values = w.partition("=")
        if not sep or not values:
            raise ConfigError(f"--where {w!r} must look like COLUMN=V1,V2")
        filters.append(spec.Filter(column=column.strip(), values=tuple(values.split(","))))
    return spec.Query(
        view=view or "", rho=budget, group_by=tuple(group_by or ()), where=tuple(filters)
    )


def _with_cap(q: spec.Query, rows_per_person: int | None) -> spec.Query:
    """The query with --rows-per-person applied (a spec or SQL may set the same cap)."""
    if rows_per_person is None:
        return q
    if not 1 <= rows_per_person <= spec.MAX_ROWS_PER_PERSON:
        raise ConfigError(
            f"--rows-per-person {rows_per_person} is out of range: give the rows counted per "
            f"person, from 1 to the view's own cap (at most {spec.MAX_ROWS_PER_PERSON})"
        )
    if q.rows_per_person is not None and q.rows_per_person != rows_per_person:
        raise ConfigError(
            f"--rows-per-person {rows_per_person} differs from the query's own rows_per_person "
            f"{q.rows_per_person}: give the cap once"
        )
    return dataclasses.replace(q, rows_per_person=rows_per_person)


def _with_secure_aggregation(
    q: spec.Query, pooled_only: bool, honest_nodes: int | None
) -> spec.Query:
    """The query with --pooled-only and --honest-nodes applied (a spec may set the same)."""
    if honest_nodes is not None:
        if not (pooled_only or q.pooled_only):
            raise ConfigError(
                "--honest-nodes goes with --pooled-only (or a spec with pooled_only: true): it "
                "says how many of the query's nodes the noise shares of secure aggregation "
                "assume honest"
            )
        if not 1 <= honest_nodes <= spec.MAX_HONEST_NODES:
            raise ConfigError(
                f"--honest-nodes {honest_nodes} is out of range: give how many of the query's "
                f"nodes to assume honest, from 1 to their number (at most {spec.MAX_HONEST_NODES})"
            )
        if q.honest_nodes is not None and q.honest_nodes != honest_nodes:
            raise ConfigError(
                f"--honest-nodes {honest_nodes} differs from the query's own honest_nodes "
                f"{q.honest_nodes}: give it once"
            )
    if not pooled_only and honest_nodes is None:
        return q
    t = honest_nodes if honest_nodes is not None else q.honest_nodes
    return dataclasses.replace(q, pooled_only=True, honest_nodes=t)


def query(
    sql_text: Annotated[
        str | None, typer.Option("--sql", help='e.g. "SELECT sex, COUNT(*) FROM copd GROUP BY sex"')
    ] = None,
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="a YAML or JSON query spec")
    ] = None,
    view: Annotated[str | None, typer.Option(help="count persons in this view")] = None,
    group_by: Annotated[
        list[str] | None, typer.Option("--group-by", "-g", help="public column (repeatable)")
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option(help="COLUMN=V1,V2 on a public column (repeatable)")
    ] = None,
    rho: Annotated[float | None, typer.Option(help="zCDP budget charged at each node")] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="budget as (epsilon, delta)-DP, converted to rho")
    ] = None,
    delta: Annotated[float, typer.Option(help="delta for --epsilon")] = 1e-6,
    rows_per_person: Annotated[
        int | None,
        typer.Option(
            "--rows-per-person",
            help="count at most N rows per person (below the view's cap: less noise, some bias)",
        ),
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="show the plan, cost and noise; spend nothing")
    ] = False,
    pooled_only: Annotated[
        bool,
        typer.Option(
            "--pooled-only",
            help="release the pooled rows only, by secure aggregation: central DP's noise, "
            "and the hub sees no node's figures",
        ),
    ] = False,
    honest_nodes: Annotated[
        int | None,
        typer.Option(
            "--honest-nodes",
            help="with --pooled-only: how many nodes the noise shares assume honest (default all)",
        ),
    ] = None,
    hub: HubOpt = None,
    identity: AnalystIdentityOpt = None,
    deadline: Annotated[float, typer.Option(help="seconds to wait for nodes")] = 30.0,
    quorum: Annotated[
        int,
        typer.Option(
            min=0,
            help="fail unless at least this many nodes answer (0: any, partial results)",
        ),
    ] = 0,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="print CSV")] = False,
    save_to: Annotated[
        Path | None,
        typer.Option(
            "--save-envelope",
            help="write the signed envelope to FILE, to read its releases again with --resend",
        ),
    ] = None,
    resend_from: Annotated[
        Path | None,
        typer.Option(
            "--resend",
            help="read again what each node kept for the envelope in FILE (charges nothing)",
        ),
    ] = None,
) -> None:
    """Run a federated DP query at every node; print per-region and pooled estimates."""
    deadline = _deadline(deadline)
    if resend_from is not None:
        given = [sql_text, spec_file, view, rho, epsilon, save_to, honest_nodes]
        if any(x is not None for x in given) or explain or pooled_only:
            raise ConfigError(
                "--resend FILE reads the query from the envelope in FILE: give no query "
                "(--sql, --spec, --view, --rho, --epsilon, --pooled-only, --honest-nodes), "
                "--explain or --save-envelope with it"
            )
        _resend(resend_from, hub, identity, deadline, as_json=as_json, as_csv=as_csv)
        return
    q = _with_cap(
        _build_query(sql_text, spec_file, view, group_by, where, rho, epsilon, delta),
        rows_per_person,
    )
    q = _with_secure_aggregation(q, pooled_only, honest_nodes)
    console = console_for_output()
    with _connect(hub, identity) as fed:
        if explain:
            explains = fed.explain(q, deadline_s=deadline)
            if as_json:
                console.print_json(report.to_json([report.explain_to_dict(e) for e in explains]))
            else:
                report.print_explain(console, explains, q)
            _fail_on(report.explain_failure(explains))
            return
        # A pooled_only query names its nodes: those the hub lists, asked within --deadline.
        named = fed.pooled_nodes(q, timeout_s=deadline) if q.pooled_only else ()
        envelope = fed.sign(q, nodes=named)
        if save_to is not None:
            # Written before the query runs: a reply lost on the way is still readable later.
            try:
                save_envelope(envelope, save_to)
            except OSError as exc:
                raise ConfigError(
                    f"--save-envelope {save_to}: cannot write it ({exc.strerror or exc})"
                ) from None
        result = fed.run(envelope, deadline_s=deadline, quorum=quorum)
    _show(result, q, as_json=as_json, as_csv=as_csv)


def _show(result: FederatedResult, q: spec.Query, *, as_json: bool, as_csv: bool) -> None:
    """Print a result as asked, then exit non-zero if it answers nothing."""
    console = console_for_output()
    if as_json:
        console.print_json(report.to_json(report.result_to_dict(result, q)))
    elif as_csv:
        typer.echo(report.result_to_csv(result, q), nl=False)
    else:
        report.print_result(console, result, q)
    _fail_on(report.result_failure(result))


def _resend(
    path: Path,
    hub: str | None,
    identity: Path | None,
    deadline: float,
    *,
    as_json: bool,
    as_csv: bool,
) -> None:
    """`chc query --resend FILE`: the releases the nodes kept for a saved envelope."""
    envelope = load_envelope(path, flag="--resend")
    try:
        q = spec_io.from_json(envelope.query)
    except QueryError as exc:
        raise ConfigError(f"--resend {path}: its query is not valid: {exc}") from None
    with _connect(hub, identity) as fed:
        result = fed.resend(envelope, deadline_s=deadline)
    _show(result, q, as_json=as_json, as_csv=as_csv)


def _fail_on(failure: report.Failure | None) -> None:
    """Exit non-zero, after the output, if no node answered or the answer is empty."""
    if failure is not None:
        code = ExitCode.REFUSED if failure.refused else ExitCode.NO_ANSWER
        raise CommandFailedError(code, failure.reason)


def nodes(
    hub: HubOpt = None,
    identity: Annotated[Path | None, typer.Option(help="identity folder")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List every node's views, their columns (kind, bounds, domain) and remaining budget."""
    console = console_for_output()
    with _connect(hub, identity) as fed:
        found, missing = fed.nodes()
    if as_json:
        console.print_json(report.to_json(report.nodes_to_dict(found, missing)))
    else:
        report.print_catalogs(console, found, missing)
    if not found:
        _fail_on(report.nobody_answered(missing))
