"""Opt-outs and children's consent, applied to the base tables before any view is built.

The custodian keeps one or more registers of decisions (CSV or Parquet), refreshed from the
National Data Opt-out service ("Check for National Data Opt-outs", by NHS number, mapped to
person_id by the custodian) and from local dissent or consent records. Columns, matched
without regard to case (only person_id and date are required):

    person_id           the OMOP person_id the decision is about
    date                when it was recorded (ISO 8601 or DD/MM/YYYY)
    source              ndoo (National Data Opt-out) | local            default: local
    decision            opt_out (or dissent) | opt_in (or consent)      default: opt_out
    decided_by          self | parent (or guardian)                     default: self
    gillick_competent   yes/no, true/false, 1/0: a child's own decision default: no

Which decision counts (DOMAIN.md section 3; the ages are configurable in node.toml):

- A person's own decision applies if they made it at `own_decision_from` (16) or older, or
  at `parent_decides_under` (13) or older while recorded as Gillick-competent.
- Otherwise a parent's or guardian's decision applies if it was made before the child reached
  `own_decision_from`. A decision stays in force until one that applies replaces it, so a
  parent's opt-out made for a 10-year-old still holds at 17 unless the person changed it.
- An applicable own decision always outranks a parent's; among equals the latest wins, and
  on the same day an opt-out wins.
- National and local registers are separate: an opt-in recorded locally does not lift a
  National Data Opt-out. `national_opt_out = false` ignores ndoo rows; set it only when the
  legal basis of the node's processing is consent (the NDOO does not apply then).
- With `children_need_consent = true`, a person under `own_decision_from` at the reference
  date is included only if the decision that applies to them is an opt-in (an opt-in model,
  as in the Born in Bradford e-consent for children).

A person excluded here has no rows in any base table, so no view, and no aggregate, can
depend on them (tests/unit/test_consent.py proves it view by view). The register must be
readable and valid, or the node refuses to start: it fails closed, never open.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import duckdb

from node.findings import Finding, Level
from node.omop import sql_ident, sql_string
from protocols.errors import ConfigError

DECISIONS_TABLE: Final = "consent_decisions"
EXCLUDED_TABLE: Final = "consent_excluded"

_OUT: Final = ("opt_out", "optout", "opt-out", "dissent", "out")
_IN: Final = ("opt_in", "optin", "opt-in", "consent", "in")
_PARENT: Final = ("parent", "guardian", "parent_or_guardian", "proxy")
_SELF: Final = ("self", "patient", "person", "child")
_TRUE: Final = ("yes", "y", "true", "t", "1")
_FALSE: Final = ("no", "n", "false", "f", "0")
_KEYS: Final = frozenset(
    {
        "registers",
        "national_opt_out",
        "parent_decides_under",
        "own_decision_from",
        "children_need_consent",
    }
)


@dataclass(frozen=True)
class ConsentPolicy:
    """The node's consent settings ([consent] in node.toml)."""

    registers: tuple[Path, ...] = ()
    national_opt_out: bool = True
    parent_decides_under: int = 13
    own_decision_from: int = 16
    children_need_consent: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.parent_decides_under <= self.own_decision_from <= 25:
            raise ConfigError(
                "consent: need 0 <= parent_decides_under <= own_decision_from <= 25, got "
                f"{self.parent_decides_under} and {self.own_decision_from}"
            )

    @property
    def active(self) -> bool:
        """True if anything can exclude a person."""
        return bool(self.registers) or self.children_need_consent


def parse_consent(raw: object, base: Path, source: str) -> ConsentPolicy:
    """Read the [consent] table of node.toml; relative paths are taken from base."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [consent] must be a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown [consent] key(s) {unknown}; known: {sorted(_KEYS)}")
    registers = raw.get("registers", [])
    if isinstance(registers, str):
        registers = [registers]
    if not (isinstance(registers, list) and all(isinstance(r, str) and r for r in registers)):
        raise ConfigError(f"{source}: consent.registers must be a list of file paths")
    flags = {}
    for key in ("national_opt_out", "children_need_consent"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ConfigError(f"{source}: consent.{key} must be true or false")
            flags[key] = raw[key]
    ages = {}
    for key in ("parent_decides_under", "own_decision_from"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: consent.{key} must be a whole number of years")
            ages[key] = value
    paths = tuple(p if (p := Path(r)).is_absolute() else base / p for r in registers)
    return ConsentPolicy(registers=paths, **flags, **ages)  # type: ignore[arg-type]


def consent_toml(policy: ConsentPolicy) -> str:
    """The [consent] table for a node.toml (used by `chc-node init`)."""
    registers = ", ".join(_toml_str(str(p)) for p in policy.registers)
    text = "\n".join(
        [
            "[consent]",
            f"registers = [{registers}]            # opt-out / dissent / consent registers",
            f"national_opt_out = {str(policy.national_opt_out).lower()}"
            "          # false only if the legal basis is consent",
            f"parent_decides_under = {policy.parent_decides_under}"
            "          # below this age a parent's or guardian's decision applies",
            f"own_decision_from = {policy.own_decision_from}"
            "             # from this age their own; between, their own if Gillick-competent",
            f"children_need_consent = {str(policy.children_need_consent).lower()}"
            "     # true: under own_decision_from, included only with an opt-in",
            "",
        ]
    )
    tomllib.loads(text)  # what we write must read back
    return text


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _relation(path: Path) -> str | None:
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        return f"read_parquet({sql_string(str(path.resolve()))})"
    if lower.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        return f"read_csv({sql_string(str(path.resolve()))}, header = true, all_varchar = true)"
    return None


def _text(column: str | None, default: str) -> str:
    if column is None:
        return sql_string(default)
    # A blank cell takes the default, like an absent column.
    text = f"nullif(lower(trim(CAST({sql_ident(column)} AS VARCHAR))), '')"
    return f"coalesce({text}, {sql_string(default)})"


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(sql_string(v) for v in values) + ")"


def _load_one(con: duckdb.DuckDBPyConnection, path: Path, index: int) -> list[Finding]:
    where = f"consent register {path}"
    if not path.is_file():
        return [Finding(Level.ERROR, where, "the file does not exist (the node fails closed)")]
    relation = _relation(path)
    if relation is None:
        return [Finding(Level.ERROR, where, "expected a .csv or .parquet file")]
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()  # noqa: S608
    except duckdb.Error as exc:
        return [Finding(Level.ERROR, where, f"cannot read it: {str(exc).splitlines()[0]}")]
    columns = {str(r[0]).lower(): str(r[0]) for r in described}
    date_col = next(
        (columns[c] for c in ("date", "recorded_date", "decision_date") if c in columns), None
    )
    if "person_id" not in columns or date_col is None:
        return [
            Finding(
                Level.ERROR,
                where,
                f"needs columns person_id and date; it has {sorted(columns)}",
            )
        ]
    raw_date = f"CAST({sql_ident(date_col)} AS VARCHAR)"
    table = f"consent_raw_{index}"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {table} AS
        SELECT TRY_CAST(TRY_CAST(CAST({sql_ident(columns["person_id"])} AS VARCHAR) AS DOUBLE)
                        AS BIGINT) AS person_id,
               coalesce(TRY_CAST({raw_date} AS DATE),
                        CAST(TRY_CAST({raw_date} AS TIMESTAMP) AS DATE),
                        CAST(try_strptime({raw_date}, '%d/%m/%Y') AS DATE)) AS date,
               {_text(columns.get("source"), "local")} AS source,
               {_text(columns.get("decision"), "opt_out")} AS decision,
               {_text(columns.get("decided_by"), "self")} AS decided_by,
               {_text(columns.get("gillick_competent"), "no")} AS gillick
        FROM {relation}
        """  # noqa: S608 - identifiers and paths are quoted
    )
    checks = {
        "person_id is missing or not a whole number": "person_id IS NULL",
        "date is missing or not a date": "date IS NULL",
        "source is not ndoo or local": "source NOT IN ('ndoo', 'local')",
        f"decision is not one of {list(_OUT + _IN)}": f"decision NOT IN {_in(_OUT + _IN)}",
        f"decided_by is not one of {list(_SELF + _PARENT)}": (
            f"decided_by NOT IN {_in(_SELF + _PARENT)}"
        ),
        "gillick_competent is not yes or no": f"gillick NOT IN {_in(_TRUE + _FALSE)}",
    }
    select = ", ".join(f"count(*) FILTER (WHERE {cond})" for cond in checks.values())
    counts = con.execute(f"SELECT {select} FROM {table}").fetchall()[0]  # noqa: S608
    return [
        Finding(Level.ERROR, where, f"{what}; fix these rows (the node fails closed)", n)
        for what, n in zip(checks, counts, strict=True)
        if n
    ]


def load_registers(con: duckdb.DuckDBPyConnection, policy: ConsentPolicy) -> list[Finding]:
    """Read every register into the temporary table consent_decisions, checking each row."""
    findings: list[Finding] = []
    for i, path in enumerate(policy.registers):
        findings += _load_one(con, path, i)
    if any(f.level is Level.ERROR for f in findings):
        return findings
    parts = [
        f"""
        SELECT person_id, date, source,
               CASE WHEN decision IN {_in(_OUT)} THEN 'out' ELSE 'in' END AS decision,
               CASE WHEN decided_by IN {_in(_PARENT)} THEN 'parent' ELSE 'self' END AS decided_by,
               gillick IN {_in(_TRUE)} AS gillick
        FROM consent_raw_{i}
        """  # noqa: S608 - constant SQL
        for i in range(len(policy.registers))
    ]
    union = (
        " UNION ALL ".join(parts)
        if parts
        else (
            "SELECT CAST(NULL AS BIGINT) AS person_id, CAST(NULL AS DATE) AS date, "
            "'' AS source, '' AS decision, '' AS decided_by, false AS gillick WHERE false"
        )
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {DECISIONS_TABLE} AS {union}")
    for i in range(len(policy.registers)):
        con.execute(f"DROP TABLE consent_raw_{i}")
    return findings


def apply_rules(
    con: duckdb.DuckDBPyConnection,
    policy: ConsentPolicy,
    *,
    persons: str,
    reference_date: date,
) -> list[Finding]:
    """Create consent_excluded(person_id) from the decisions and the person table.

    `persons` is a relation with person_id and birth_date (one row per person). Needs
    load_registers to have run first.
    """
    sources = ("ndoo", "local") if policy.national_opt_out else ("local",)
    ref = f"DATE {sql_string(reference_date.isoformat())}"
    own, parent = int(policy.own_decision_from), int(policy.parent_decides_under)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE consent_effective AS
        WITH d AS (
            SELECT c.*, date_sub('year', p.birth_date, c.date) AS age_at
            FROM {DECISIONS_TABLE} AS c JOIN {persons} AS p USING (person_id)
            WHERE c.source IN {_in(sources)}
        ),
        ranked AS (
            SELECT person_id, source, decision,
                   -- an applicable own decision (tier 1) outranks a parent's (tier 2)
                   CASE WHEN decided_by = 'self'
                             AND (age_at >= {own} OR (age_at >= {parent} AND gillick)) THEN 1
                        WHEN decided_by = 'parent' AND age_at < {own} THEN 2 END AS tier,
                   date
            FROM d
        )
        SELECT person_id, source, decision FROM ranked
        WHERE tier IS NOT NULL
        QUALIFY row_number() OVER (
            PARTITION BY person_id, source
            ORDER BY tier, date DESC, (decision = 'out') DESC
        ) = 1
        """  # noqa: S608 - ages are ints, sources constants
    )
    children = (
        f"""
        UNION
        SELECT p.person_id FROM {persons} AS p
        WHERE date_sub('year', p.birth_date, {ref}) < {own}
          AND p.person_id NOT IN (
              SELECT person_id FROM consent_effective WHERE decision = 'in')
        """  # noqa: S608 - constants
        if policy.children_need_consent
        else ""
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {EXCLUDED_TABLE} AS
        SELECT person_id FROM consent_effective WHERE decision = 'out'
        {children}
        """  # noqa: S608 - constant SQL
    )
    counts = con.execute(
        f"""
        SELECT (SELECT count(*) FROM {EXCLUDED_TABLE}),
               (SELECT count(*) FROM consent_effective WHERE decision = 'out'),
               (SELECT count(*) FROM {DECISIONS_TABLE} AS c
                 WHERE c.person_id NOT IN (SELECT person_id FROM {persons})),
               (SELECT count(*) FROM {DECISIONS_TABLE})
        """  # noqa: S608 - constant SQL
    ).fetchall()[0]
    findings = [
        Finding(
            Level.NOTE,
            "consent",
            f"{counts[3]:,} decisions read; {counts[1]:,} persons opted out"
            + (
                f"; {counts[0] - counts[1]:,} more children excluded for want of consent"
                if policy.children_need_consent
                else ""
            )
            + f"; {counts[0]:,} persons excluded from every view",
        )
    ]
    if counts[2]:
        findings.append(
            Finding(
                Level.NOTE,
                "consent",
                "decisions about person_ids not in the person table (nothing to exclude)",
                counts[2],
            )
        )
    con.execute("DROP TABLE consent_effective")
    return findings
