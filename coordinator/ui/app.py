"""The dashboard's routes: Federation, Query, Models, History and Audit pages, server-rendered.

Every page is complete HTML without JavaScript; the one small script only refreshes the
Federation page's nodes table from /fragments/nodes. Endpoints that call the hub are plain
`def`s, which Starlette runs in its thread pool, so a slow node never blocks the event loop.
A ChcError renders its message (it says what to do); anything else renders a generic page
and is logged here, on the user's machine, never shown to the browser.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from coordinator.analyst.client import Federation, NodeBudget, with_secure_aggregation
from coordinator.learning.compare import DEFAULT_RHO as COMPARE_RHO
from coordinator.ui import history as history_store
from coordinator.ui import model_charts, models
from coordinator.ui.audit import AuditReport, remote_audit
from coordinator.ui.auth import Guard
from coordinator.ui.spend_chart import spend_svg
from protocols.cli import error_message, error_reference
from protocols.security.pki import Identity
from queries import spec
from queries.combine import POOLED
from queries.errors import ChcError, QueryError
from queries.present import cells
from queries.present.chart import result_chart_svg
from queries.present.frames import result_arrow
from queries.present.secure import compare_noise, guarantee_text, secure_guarantee
from queries.results import FederatedResult, NodeDescription, NodeExplain, NodeOutcome
from queries.schema import ViewSpec
from queries.sql import parse_sql

log = logging.getLogger("chc.ui")

HERE = Path(__file__).parent
# A form is an SQL query and a number: far below this. Longer bodies are refused unread.
MAX_FORM_BYTES = 64 * 1024
# What the Federation page waits for the hub; the page refreshes every 5 s.
NODES_TIMEOUT_S = 10.0
DEFAULT_RHO = 0.05

# gRPC status names of ChcErrors, as HTTP statuses for the page that shows the message.
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 403,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "ABORTED": 409,
    "NOT_FOUND": 404,
}
_HEADERS = {
    # Everything is served from here; the charts are inline SVG with style attributes.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Same-origin: POSTs still carry their Origin (no-referrer would make it "null").
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class UiConfig:
    """What the app acts with: the user's hub, identities and history store."""

    hub: str
    identity: Identity  # the analyst's: signs every query
    history: history_store.History
    guard: Guard
    auditor: Identity | None = None  # the auditor's, for the Audit page
    server_name: str = "hub"


def http_status(exc: ChcError) -> int:
    """The HTTP status of a page showing a ChcError."""
    if isinstance(exc, ConnectionError) and exc.status_name == "INTERNAL":
        # A hub or node out of reach (a ConnectionError without a status of its own) is a
        # 503, not a fault of this app.
        return 503
    return _HTTP_STATUS.get(exc.status_name, 500)


@dataclass(frozen=True)
class NodeRow:
    """One row of the Federation page's nodes table."""

    node: str
    status: str
    message: str
    description: NodeDescription | None
    budget: NodeBudget | None


def _node_rows(fed: Federation) -> tuple[list[NodeRow], str]:
    """Every node with its catalog and budgets, and a note if the budget probe failed."""
    found, missing = fed.nodes(timeout_s=NODES_TIMEOUT_S)
    note = ""
    try:
        budgets = {b.node: b for b in fed.budget(timeout_s=NODES_TIMEOUT_S)}
    except ChcError as exc:
        budgets, note = {}, f"your own remaining budget is unknown: {error_message(exc)}"
    rows = [NodeRow(d.node, "ok", "", d, budgets.get(d.node)) for d in found]
    rows += [NodeRow(o.node, o.status.value, o.message, None, None) for o in missing]
    return sorted(rows, key=lambda r: r.node), note


def _example_sql(rows: Sequence[NodeRow]) -> str:
    """A first query a newcomer can run as is: a count by a small public category."""
    for row in rows:
        if row.description is None:
            continue
        for view in row.description.catalog.views:
            for column in view.columns:
                if column.domain and len(column.domain) <= 12 and column.type.value == "category":
                    # Names from the node's catalog, put in the editor for the user to run;
                    # parse_sql checks whatever comes back.
                    by = column.name
                    return f"SELECT {by}, COUNT(*) FROM {view.name} GROUP BY {by}"  # noqa: S608
            return f"SELECT COUNT(*) FROM {view.name}"  # noqa: S608
    return "SELECT COUNT(*) FROM persons"


def _default_rho(rows: Sequence[NodeRow]) -> float:
    """DEFAULT_RHO, or less if some node allows less per query."""
    caps = [r.description.budget.max_rho_per_query for r in rows if r.description is not None]
    return min([DEFAULT_RHO, *caps])


def _rho(text: str) -> float:
    try:
        rho = float(text)
    except ValueError:
        raise QueryError(
            f"rho {text[:40]!r} is not a number: give the zCDP budget charged at each node, "
            "e.g. 0.05"
        ) from None
    if not math.isfinite(rho) or rho <= 0:
        raise QueryError(f"rho must be a positive number (the budget per node), got {text[:40]}")
    return rho


def _honest_nodes(text: str) -> int | None:
    """The form's honest-nodes field: None when blank (assume every node of the round honest)."""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise QueryError(
            f"honest nodes {text[:40]!r} is not a whole number: give how many of the query's "
            "nodes the noise shares assume honest, or leave it blank to assume all of them"
        ) from None


def _pooled_box(form: dict[str, str]) -> bool:
    """Whether the form's "Pooled only (secure aggregation)" box is ticked."""
    return form.get("pooled_only", "") == "on"


def _secure_query(query: spec.Query, form: dict[str, str]) -> spec.Query:
    """The query with the form's secure-aggregation choice (pooled only, honest nodes)."""
    pooled = _pooled_box(form)
    honest = _honest_nodes(form.get("honest_nodes", "").strip())
    if honest is not None and not pooled:
        raise QueryError(
            "honest nodes only applies to a pooled-only query: tick 'Pooled only (secure "
            "aggregation)', or leave honest nodes blank"
        )
    return with_secure_aggregation(query, pooled_only=pooled, honest_nodes=honest)


def _secure_explain_context(explains: Sequence[NodeExplain]) -> dict[str, Any]:
    """What the Explain section adds for a pooled-only query: the guarantee and both noises."""
    guarantee = secure_guarantee(explains)
    return {
        "secure_guarantee": guarantee_text(guarantee, ran=False) if guarantee else "",
        "noise_comparison": compare_noise(explains),
    }


def _parse_form(body: bytes) -> dict[str, str]:
    """A URL-encoded form's fields (the first value of each), parsed without python-multipart."""
    if len(body) > MAX_FORM_BYTES:
        raise QueryError(f"the form is larger than {MAX_FORM_BYTES // 1024} KB: shorten the SQL")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise QueryError("the form is not UTF-8") from None
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


def _result_rows(result: FederatedResult) -> tuple[list[str], list[dict[str, Any]]]:
    """The result table's rows as the page shows them, and its group columns."""
    frame = result_arrow(result)
    groups = cells.group_columns(frame)
    rows = []
    for r in frame.to_pylist():
        rows.append(
            {
                "region": r["region"],
                "pooled": r["region"] == POOLED,
                "groups": [r[c] for c in groups],
                "group_label": cells.group_label(r, groups),
                "measure": r["measure"],
                "estimate": cells.number(r["estimate"]),
                "raw_estimate": r["estimate"],
                "interval": cells.interval(r["ci_low"], r["ci_high"]),
                "suppressed": bool(r["suppressed"]),
                "partial": bool(r["partial"]),
                "node_status": r["node_status"],
                "rho_spent": r["rho_spent"],
            }
        )
    return groups, rows


def _charts(result: FederatedResult) -> list[Markup]:
    """One chart per measure of a result (the chart module escapes what it draws)."""
    measures = list(dict.fromkeys(str(m) for m in result.table.column("measure").to_pylist()))
    return [Markup(result_chart_svg(result, measure=m)) for m in measures]  # noqa: S704


def _outcomes(nodes: Sequence[NodeOutcome]) -> list[NodeOutcome]:
    return sorted(nodes, key=lambda o: o.node)


def create_app(config: UiConfig, *, federation: Federation | None = None) -> FastAPI:
    """The dashboard as an ASGI app; `federation` defaults to one built from config."""
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters["number"] = cells.number
    lock = threading.Lock()
    connected: list[Federation] = [federation] if federation is not None else []

    def fed() -> Federation:
        with lock:
            if not connected:
                connected.append(
                    Federation(config.hub, config.identity, server_name=config.server_name)
                )
            return connected[0]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for f in connected:
            f.close()

    app = FastAPI(
        title="chc ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.middleware("http")(config.guard)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        for k, v in _HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("analyst", config.identity.name)
        context.setdefault("hub", config.hub)
        return HTMLResponse(templates.get_template(name).render(**context), status_code=status)

    @app.exception_handler(ChcError)
    def chc_error(_request: Request, exc: ChcError) -> HTMLResponse:
        return page("error.html", http_status(exc), error=error_message(exc))

    @app.exception_handler(Exception)
    def unexpected(request: Request, exc: Exception) -> HTMLResponse:
        # The traceback stays in this terminal: the browser gets the reference only.
        reference = error_reference(exc)
        log.error("internal error at %s (ref %s)", request.url.path, reference, exc_info=exc)
        return page("error.html", 500, error="", reference=reference)

    def federation_context() -> dict[str, Any]:
        try:
            rows, note = _node_rows(fed())
        except ChcError as exc:
            return {"rows": [], "note": "", "error": error_message(exc)}
        return {"rows": rows, "note": note, "error": ""}

    @app.get("/", response_class=HTMLResponse)
    def federation_page() -> HTMLResponse:
        return page("federation.html", active="federation", **federation_context())

    @app.get("/fragments/nodes", response_class=HTMLResponse)
    def nodes_fragment() -> HTMLResponse:
        return page("nodes_table.html", **federation_context())

    def query_page(
        status: int = 200,
        *,
        sql: str | None = None,
        rho: str | None = None,
        form: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        try:
            rows, _ = _node_rows(fed())
            catalog_error = ""
        except ChcError as exc:
            rows, catalog_error = [], error_message(exc)
        return page(
            "query.html",
            status,
            active="query",
            rows=rows,
            catalog_error=catalog_error,
            sql=sql if sql is not None else _example_sql(rows),
            rho=rho if rho is not None else f"{_default_rho(rows):g}",
            pooled_only=_pooled_box(form or {}),
            honest_nodes=(form or {}).get("honest_nodes", "").strip()[:20],
            **context,
        )

    @app.get("/query", response_class=HTMLResponse)
    def query_form() -> HTMLResponse:
        return query_page()

    @app.post("/query", response_class=HTMLResponse)
    async def query_post(request: Request) -> HTMLResponse:
        form = _parse_form(await request.body())
        return await _run_in_thread(lambda: submit(form))

    def submit(form: dict[str, str]) -> HTMLResponse:
        sql, rho_text = form.get("sql", ""), form.get("rho", "").strip()
        action = form.get("action", "run")
        if action not in ("explain", "run"):
            return query_page(
                400, sql=sql, rho=rho_text, form=form, error=f"unknown action {action[:20]!r}"
            )
        query_json = ""
        try:
            query = _secure_query(parse_sql(sql, rho=_rho(rho_text)), form)
            query_json = spec.canonical_bytes(query).decode()
            if action == "explain":
                explains = fed().explain(query)
                return query_page(
                    sql=sql,
                    rho=rho_text,
                    form=form,
                    query=query,
                    explains=explains,
                    explained=True,
                    **(_secure_explain_context(explains) if query.pooled_only else {}),
                )
            result = fed().query(query)
        except ChcError as exc:
            message = error_message(exc)
            entry_id = None
            if action == "run" and query_json:  # a query the hub refused is history too
                entry_id = config.history.add_error(sql, query_json, message)
            return query_page(
                http_status(exc), sql=sql, rho=rho_text, form=form, error=message, entry_id=entry_id
            )
        entry_id = config.history.add_result(sql, query_json, result)
        return query_page(
            sql=sql, rho=rho_text, form=form, **_result_context(result), entry_id=entry_id
        )

    @app.get("/history", response_class=HTMLResponse)
    def history_page() -> HTMLResponse:
        return page("history.html", active="history", entries=config.history.entries())

    def entry_or_404(entry_id: int) -> history_store.Entry:
        entry = config.history.get(entry_id)
        if entry is None:
            raise _NotFoundError(
                f"history entry {entry_id} does not exist: pick one from the History page"
            )
        return entry

    def export_of(entry_id: int) -> pa.Table:
        entry = entry_or_404(entry_id)
        table = history_store.entry_table(entry)
        if table is None:
            raise _NotFoundError(
                f"history entry {entry_id} failed ({entry.message}): it has no result to export"
            )
        return table

    @app.get("/history/{entry_id:int}.csv")
    def export_csv(entry_id: int) -> Response:
        return _download(
            history_store.to_csv(export_of(entry_id)),
            "text/csv; charset=utf-8",
            f"chc-{entry_id}.csv",
        )

    @app.get("/history/{entry_id:int}.parquet")
    def export_parquet(entry_id: int) -> Response:
        return _download(
            history_store.to_parquet(export_of(entry_id)),
            "application/vnd.apache.parquet",
            f"chc-{entry_id}.parquet",
        )

    @app.get("/history/{entry_id:int}", response_class=HTMLResponse)
    def history_entry(entry_id: int) -> HTMLResponse:
        entry = entry_or_404(entry_id)
        context: dict[str, Any] = {}
        if entry.result is not None:
            context = _result_context(entry.result)
        elif entry.record is not None and entry.kind == history_store.KIND_MODEL:
            context = _fit_context(entry.record)
        elif entry.record is not None and entry.kind == history_store.KIND_COMPARISON:
            context = _comparison_context(entry.record)
        return page("entry.html", active="history", entry=entry, **context)

    def models_page(status: int = 200, *, form: models.Form, **context: Any) -> HTMLResponse:
        try:
            rows, _ = _node_rows(fed())
            catalog_error = ""
        except ChcError as exc:
            rows, catalog_error = [], error_message(exc)
        views = _pathways(rows)
        chosen = models.first(form, "view") or (views[0].name if views else "")
        view = next((v for v in views if v.name == chosen), None)
        if view is None and views and not catalog_error:
            catalog_error = (
                f"no node publishes a view {chosen[:40]!r}: pick a pathway from the list"
            )
        cap = min(
            [r.description.budget.max_rho_per_query for r in rows if r.description is not None]
            or [COMPARE_RHO]
        )
        return page(
            "models.html",
            status,
            active="models",
            views=views,
            view=view,
            mv=models.FormValues(form if models.first(form, "form") == "model" else {}),
            cv=models.FormValues(form if models.first(form, "form") == "compare" else {}),
            catalog_error=catalog_error,
            models=models,
            model_rho=f"{min(models.DEFAULT_MODEL_RHO, cap):g}",
            compare_rho=f"{min(COMPARE_RHO, cap):g}",
            **context,
        )

    @app.get("/models", response_class=HTMLResponse)
    def models_form(request: Request) -> HTMLResponse:
        form = {k: request.query_params.getlist(k) for k in request.query_params}
        return models_page(form={k: v for k, v in form.items() if k == "view"})

    @app.post("/models", response_class=HTMLResponse)
    async def models_post(request: Request) -> HTMLResponse:
        form = _parse_multi_form(await request.body())
        return await _run_in_thread(lambda: submit_model(form))

    def submit_model(form: models.Form) -> HTMLResponse:
        action = models.first(form, "action", "fit")
        if action not in ("explain", "fit"):
            return models_page(400, form=form, error=f"unknown action {action[:20]!r}")
        spec_json = ""
        description = ""
        try:
            model = models.model_from_form(form)
            spec_json, description = models.spec_json(model), models.describe(model)
            if action == "explain":
                return models_page(
                    form=form,
                    explains=fed().explain(model),
                    explain_rho=model.rho,
                    explain_steps=model.steps,
                    explained="model",
                )
            record = models.fit(fed(), model)
        except ChcError as exc:
            message = error_message(exc)
            entry_id = None
            if action == "fit" and spec_json:  # a fit the nodes refused is history too
                entry_id = config.history.add_error(
                    description, spec_json, message, kind=history_store.KIND_MODEL
                )
            return models_page(
                http_status(exc), form=form, error=message, entry_id=entry_id, failed="model"
            )
        entry_id = config.history.add_record(
            history_store.KIND_MODEL,
            description,
            spec_json,
            query_id=str(record["fit"]["query_id"]),
            partial=bool(record["fit"]["partial"]),
            record=record,
        )
        return models_page(form=form, entry_id=entry_id, **_fit_context(record))

    @app.post("/models/compare", response_class=HTMLResponse)
    async def compare_post(request: Request) -> HTMLResponse:
        form = _parse_multi_form(await request.body())
        return await _run_in_thread(lambda: submit_comparison(form))

    def submit_comparison(form: models.Form) -> HTMLResponse:
        action = models.first(form, "action", "compare")
        if action not in ("explain", "compare"):
            return models_page(400, form=form, error=f"unknown action {action[:20]!r}")
        spec_json = ""
        description = ""
        try:
            wanted = models.comparison_from_form(form)
            spec_json = models.spec_json(wanted.model)
            description = f"O/E by {wanted.by}, " + models.describe(wanted.model)
            if action == "explain":
                return models_page(
                    form=form,
                    explains=fed().explain(wanted.model),
                    explain_rho=wanted.model.rho,
                    explain_steps=wanted.model.steps,
                    explained="comparison",
                )
            record = models.run_comparison(fed(), wanted)
        except ChcError as exc:
            message = error_message(exc)
            entry_id = None
            if action == "compare" and spec_json:
                entry_id = config.history.add_error(
                    description, spec_json, message, kind=history_store.KIND_COMPARISON
                )
            return models_page(
                http_status(exc),
                form=form,
                error=message,
                entry_id=entry_id,
                failed="comparison",
            )
        fit = record["comparison"]["fit"]
        entry_id = config.history.add_record(
            history_store.KIND_COMPARISON,
            description,
            spec_json,
            query_id=str(fit["query_id"]),
            partial=bool(fit["partial"]),
            record=record,
        )
        return models_page(form=form, entry_id=entry_id, **_comparison_context(record))

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page() -> HTMLResponse:
        if config.auditor is None:
            return page("audit.html", active="audit", report=None)
        report: AuditReport = remote_audit(config.hub, config.auditor)
        return page(
            "audit.html",
            active="audit",
            report=report,
            auditor=config.auditor.name,
            by_analyst=Markup(spend_svg(report.spend, "analyst")),  # noqa: S704
            by_view=Markup(spend_svg(report.spend, "view")),  # noqa: S704
        )

    return app


class _NotFoundError(LookupError, ChcError):
    """A history entry that is not there."""

    status_name = "NOT_FOUND"


def _result_context(result: FederatedResult) -> dict[str, Any]:
    groups, rows = _result_rows(result)
    return {
        "result": result,
        "groups": groups,
        "result_rows": rows,
        "outcomes": _outcomes(result.nodes),
        "charts": _charts(result),
        "result_guarantee": (
            guarantee_text(result.secure_aggregation) if result.secure_aggregation else ""
        ),
    }


def _fit_context(record: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a fit: its coefficient table and forest plot."""
    return {
        "fit": record["fit"],
        "ratio_name": record.get("ratio_name") or "",
        "coefficients": models.coefficient_rows(record),
        "forest": Markup(model_charts.forest_svg(record)),  # noqa: S704 (escaped there)
    }


def _comparison_context(record: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a comparison: its O/E table, funnel plot and the fit."""
    comparison = record["comparison"]
    return {
        "comparison": comparison,
        "adjustment": record.get("adjustment") or "",
        "units": models.unit_rows(record),
        "funnel": Markup(model_charts.funnel_svg(record)),  # noqa: S704 (escaped there)
        "adjusting": _fit_context(
            {"fit": comparison["fit"], "ratio_name": record.get("ratio_name") or ""}
        ),
    }


def _pathways(rows: Sequence[NodeRow]) -> list[ViewSpec]:
    """The views the nodes publish (each once, as the first node describing it has it)."""
    seen: dict[str, ViewSpec] = {}
    for row in rows:
        if row.description is not None:
            for view in row.description.catalog.views:
                seen.setdefault(view.name, view)
    return list(seen.values())


def _parse_multi_form(body: bytes) -> dict[str, list[str]]:
    """A URL-encoded form with every value of repeated fields (checkboxes)."""
    if len(body) > MAX_FORM_BYTES:
        raise QueryError(f"the form is larger than {MAX_FORM_BYTES // 1024} KB")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise QueryError("the form is not UTF-8") from None
    return parse_qs(text, keep_blank_values=True)


def _download(data: bytes, media_type: str, filename: str) -> Response:
    return Response(
        data,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def _run_in_thread(work: Callable[[], HTMLResponse]) -> HTMLResponse:
    """Blocking hub calls off the event loop (the body was read on it)."""
    return await run_in_threadpool(work)
