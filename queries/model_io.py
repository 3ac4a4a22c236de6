"""A model spec's JSON: the canonical bytes analysts sign, and parsing with precise errors.

Kept apart from queries/model.py (the spec itself) so that each stays small; every refusal
names the field and what to do, as for a query (queries/spec_io.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from queries.errors import QueryError
from queries.model import MAX_COVARIATES, MODEL_VERSION, Covariate, Family, ModelSpec
from queries.spec import MAX_FILTERS, Filter, quote


def model_bytes(model: ModelSpec) -> bytes:
    """The deterministic encoding of a model that analysts sign and ledgers hash."""
    return json.dumps(model.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def is_model(query: bytes) -> bool:
    """Whether signed query bytes hold a model spec rather than a query (by its version)."""
    try:
        parsed = json.loads(query)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get("version") == MODEL_VERSION


_KEYS = frozenset(
    {
        "version",
        "view",
        "outcome",
        "family",
        "covariates",
        "rho",
        "region",
        "offset",
        "event",
        "outcome_clamp",
        "iterations",
        "cohort",
        "where",
        "compare_by",
        "solver",
        "hidden",
        "clip",
    }
)


def _pair(raw: object, what: str) -> tuple[float, float]:
    if not (
        isinstance(raw, list | tuple)
        and len(raw) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw)
    ):
        raise QueryError(f"{what} must be two numbers [lower, upper]")
    return float(raw[0]), float(raw[1])


def _covariate_from(raw: object, i: int) -> Covariate:
    if isinstance(raw, str):
        return Covariate(column=raw)
    if not isinstance(raw, Mapping) or "column" not in raw:
        raise QueryError(f"covariates[{i}] must be a column name or a mapping with 'column'")
    unknown = sorted(set(raw) - {"column", "reference", "clamp"})
    if unknown:
        raise QueryError(f"covariates[{i}]: unknown key(s) {quote(unknown)}")
    reference = raw.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise QueryError(f"covariates[{i}].reference must be a level (a string)")
    clamp = _pair(raw["clamp"], f"covariates[{i}].clamp") if "clamp" in raw else None
    return Covariate(column=str(raw["column"]), reference=reference, clamp=clamp)


def model_from_dict(data: object) -> ModelSpec:
    """A ModelSpec from a parsed JSON/YAML mapping, with errors that name the bad field."""
    if not isinstance(data, Mapping):
        raise QueryError("a model spec must be a mapping with view, outcome, family and rho")
    unknown = sorted(str(k)[:24] for k in set(data) - _KEYS)
    if unknown:
        raise QueryError(f"unknown field(s) {unknown} in model spec; known: {sorted(_KEYS)}")
    if data.get("version", MODEL_VERSION) != MODEL_VERSION:
        raise QueryError(f"unsupported model version; this node speaks {MODEL_VERSION}")
    for key in ("view", "outcome", "family", "rho"):
        if key not in data:
            raise QueryError(f"model spec has no {key!r}")
    try:
        family = Family(data["family"])
    except ValueError:
        raise QueryError(
            f"unknown family {quote(data['family'])}; one of {[f.value for f in Family]}"
        ) from None
    raw = data.get("covariates", [])
    if not isinstance(raw, list):
        raise QueryError("covariates must be a list")
    if len(raw) > MAX_COVARIATES:
        raise QueryError(f"a model takes at most {MAX_COVARIATES} covariates")
    cohort = None
    if data.get("cohort") is not None:
        from queries.cohort import cohort_from_dict  # cohort.py builds on spec.py, as this does

        cohort = cohort_from_dict(data["cohort"])
    raw_where = data.get("where", [])
    if not isinstance(raw_where, list) or len(raw_where) > MAX_FILTERS:
        raise QueryError(f"where must be a list of at most {MAX_FILTERS} filters")
    where = []
    for i, f in enumerate(raw_where):
        if not isinstance(f, Mapping) or set(f) != {"column", "values"}:
            raise QueryError(f"where[{i}] must be a mapping with 'column' and 'values'")
        values = f["values"]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise QueryError(f"where[{i}].values must be a list of strings")
        where.append(Filter(column=str(f["column"]), values=tuple(values)))
    region = data.get("region", False)
    if not isinstance(region, bool):
        raise QueryError("region must be true or false")
    return ModelSpec(
        view=data["view"],
        outcome=data["outcome"],
        family=family,
        covariates=tuple(_covariate_from(c, i) for i, c in enumerate(raw)),
        rho=data["rho"],
        region=region,
        offset=data.get("offset"),
        event=data.get("event"),
        outcome_clamp=(
            _pair(data["outcome_clamp"], "outcome_clamp") if "outcome_clamp" in data else None
        ),
        iterations=data.get("iterations"),
        cohort=cohort,
        where=tuple(where),
        compare_by=_text_or_none(data.get("compare_by"), "compare_by"),
        solver=_text_or_none(data.get("solver"), "solver") or "newton",
        hidden=data.get("hidden", 0),
        clip=data.get("clip", 1.0),
    )


def _text_or_none(raw: object, what: str) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    raise QueryError(f"{what} must be a column name (a string)")


def model_from_json(text: bytes | str) -> ModelSpec:
    """Parse the canonical (or any JSON) encoding of a model spec."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise QueryError(f"a model spec must be JSON: {exc}") from None
    return model_from_dict(data)
