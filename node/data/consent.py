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
readable and valid, or the node refuses to start: it fails closed, never open. person_id is
read exactly (digits only, within BIGINT), never through a floating-point or lenient cast
that could move a decision to another person. A running node re-reads the registers when
they change (register_states here, the rebuild in node/store.py).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import duckdb

from node.data.findings import Finding, Level
from node.data.omop import sql_ident, sql_string
from queries.errors import ConfigError

DECISIONS_TABLE: Final = "consent_decisions"
EXCLUDED_TABLE: Final = "consent_excluded"

_SOURCES: Final = ("ndoo", "local")
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


@dataclass(frozen=True)
class RegisterState:
    """A register file as found on disk: enough to tell cheaply whether it has changed."""

    path: Path
    stat: tuple[int, ...] | None  # device, inode, size, mtime and ctime in ns; None if absent
    digest: str | None  # SHA-256 of the content; None if absent or unreadable
    settled: bool  # last modified long enough before it was hashed to trust the stat

    @property
    def content(self) -> tuple[Path, bool, str | None]:
        """What the node would read: the path, whether the file exists, and its hash."""
        return self.path, self.stat is not None, self.digest


# Filesystem timestamps are coarse (4 ms on ext4, 1-2 s on some), so a rewrite of the same
# size within one tick of the last hash keeps the stat: such a file is hashed again next time.
_SETTLE_NS: Final = 2_000_000_000


def _digest(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def register_states(
    paths: Sequence[Path], previous: Sequence[RegisterState] = ()
) -> tuple[RegisterState, ...]:
    """Stat every register, hashing its content only if the stat changed or was unsettled."""
    before = {s.path: s for s in previous}
    states = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            states.append(RegisterState(path, None, None, settled=True))
            continue
        stat = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        old = before.get(path)
        if old is not None and old.stat == stat and old.settled:
            states.append(old)
            continue
        now = time.time_ns()  # before reading: a later write shows in the stat
        settled = now - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLE_NS
        states.append(RegisterState(path, stat, _digest(path), settled))
    return tuple(states)


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
    kind = _relation_kind(path)
    if kind == "parquet":
        return f"read_parquet({sql_string(str(path.resolve()))})"
    if kind == "csv":
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


def _not_in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} NOT IN {_in(values)}"


# A person_id is written as digits, with an optional sign and surrounding blanks; DuckDB's own
# casts would also take '12.6' (as 13), '1e3', '0x1F' and '1_000', and DOUBLE rounds ids
# above 2^53, so an opt-out could land on a neighbour. The node reads person_id as BIGINT.
_ID_DIGITS: Final = r"^\s*([+-]?[0-9]+)\s*$"
ID_MIN: Final = -(2**63)
ID_MAX: Final = 2**63 - 1
_FLOAT_TYPES: Final = ("FLOAT", "DOUBLE", "REAL", "FLOAT4", "FLOAT8")
SHOWN_ROWS: Final = 5  # rows (and values) a finding lists; its count says how many in all


def _person_id(column: str) -> str:
    """SQL columns id_text, id_whole and person_id: the id exactly, or NULL."""
    text = f"CAST({sql_ident(column)} AS VARCHAR)"
    digits = f"regexp_extract(coalesce({text}, ''), {sql_string(_ID_DIGITS)}, 1)"
    # HUGEINT holds any 38-digit number exactly; longer digit strings are out of range too.
    huge = f"TRY_CAST(nullif({digits}, '') AS HUGEINT)"
    return (
        f"{text} AS id_text, {digits} <> '' AS id_whole, "
        f"CASE WHEN {huge} BETWEEN {ID_MIN} AND {ID_MAX} THEN CAST({huge} AS BIGINT) END "
        "AS person_id"
    )


def _csv_lines(
    con: duckdb.DuckDBPyConnection, path: Path, rows: int, ids: dict[int, str | None]
) -> dict[int, int] | None:
    """File line numbers of the given data rows (0-based, as DuckDB read them), or None.

    DuckDB skips blank lines and lets quoted fields span lines, so the line is found by
    reading the file again with the dialect DuckDB sniffed. The answer is used only if it
    agrees with DuckDB: the same number of rows, and the same person_id text on every row
    asked about; otherwise the report gives data-row numbers instead.
    """
    try:
        sniffed = con.execute(
            "SELECT Delimiter, Quote, Escape, SkipRows "  # noqa: S608 - quoted path
            f"FROM sniff_csv({sql_string(str(path.resolve()))}, header = true)"
        ).fetchall()[0]
    except duckdb.Error:
        return None
    delimiter, quote, escape, skip = (str(v) for v in sniffed)
    quoting = quote != "(empty)"
    if len(delimiter) != 1 or (quoting and len(quote) != 1):
        return None
    doubled = escape in ("(empty)", quote)
    found: dict[int, int] = {}
    row = -1
    try:
        reader = csv.reader(
            _text_lines(path),
            delimiter=delimiter,
            quotechar=quote if quoting else None,
            quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
            doublequote=doubled,
            escapechar=None if doubled else escape,
            strict=False,
        )
        id_index: int | None = None
        start = 1
        for record in reader:
            line, start = start, reader.line_num + 1  # the record's first line, the next's
            if not record or line <= int(skip):
                continue  # DuckDB skips blank lines
            if id_index is None:
                names = [n.strip().lower() for n in record]
                if "person_id" not in names:
                    return None
                id_index = names.index("person_id")
                continue
            row += 1
            if row in ids:
                got = record[id_index] if id_index < len(record) else ""
                if got != (ids[row] or ""):
                    return None
                found[row] = line
    except (OSError, csv.Error, ValueError):
        return None
    return found if row + 1 == rows and len(found) == len(ids) else None


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a text file, gzip-compressed or not."""
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
            yield from f
    else:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            yield from f


def _rows_detail(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    rows: int,
    shown: list[tuple[int, str | None, str | None]],
    more: int,
) -> str:
    """Where the rows are and what they hold: "lines 3 ('12.6'), 9 ('')" for a CSV file,
    "data rows 2 ('12.6')" for Parquet."""
    lines = (
        _csv_lines(con, path, rows, {r: id_text for r, id_text, _ in shown})
        if _relation_kind(path) == "csv"
        else None
    )
    if lines is not None:
        label, numbers = "line", [lines[r] for r, _, _ in shown]
    else:
        # Parquet (or a CSV the node could not map to lines): 1-based rows after the header.
        label, numbers = "data row", [r + 1 for r, _, _ in shown]
    parts = [
        f"{n} ({'' if v is None else v!r})" for n, (_, _, v) in zip(numbers, shown, strict=True)
    ]
    plural = "s" if len(parts) > 1 else ""
    return f"{label}{plural} {', '.join(parts)}" + (f" and {more:,} more" if more else "")


def _relation_kind(path: Path) -> str | None:
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        return "csv"
    return None


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
        return [
            Finding(
                Level.ERROR,
                where,
                "cannot be read as CSV or Parquet; fix or replace the file (the node fails closed)",
                detail=str(exc).strip().splitlines()[0] if str(exc).strip() else None,
            )
        ]
    columns = {str(r[0]).lower(): str(r[0]) for r in described}
    types = {str(r[0]).lower(): str(r[1]).upper() for r in described}
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
    if types["person_id"] in _FLOAT_TYPES:
        return [
            Finding(
                Level.ERROR,
                where,
                f"person_id is stored as {types['person_id']}, which rounds ids above 2^53 "
                "to a neighbour; write it as an integer or text column (the node fails "
                "closed)",
            )
        ]
    raw_date = f"CAST({sql_ident(date_col)} AS VARCHAR)"
    table = f"consent_raw_{index}"
    # Row order is the file's (DuckDB preserves insertion order), so rowid numbers the rows.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {table} AS
        SELECT {_person_id(columns["person_id"])},
               {raw_date} AS date_text,
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
    fails = " (the node fails closed)"
    # (what is wrong and what to do, the rows it applies to, the value to show)
    checks = [
        (
            "person_id is missing or not a whole number (write digits only, e.g. 42; 42.0, "
            "12.6 and 1e3 are refused: floating-point exports write them, and round ids "
            f"above 2^53); correct or remove these rows{fails}",
            "NOT id_whole",
            "id_text",
        ),
        (
            f"person_id is outside the range of OMOP person_ids ({ID_MIN} to {ID_MAX}); "
            f"correct or remove these rows{fails}",
            "id_whole AND person_id IS NULL",
            "id_text",
        ),
        (
            f"date is missing or not a date (ISO 8601 or DD/MM/YYYY); fix these rows{fails}",
            "date IS NULL",
            "date_text",
        ),
        (
            f"source is not ndoo or local; fix these rows{fails}",
            _not_in("source", _SOURCES),
            "source",
        ),
        (
            f"decision is not one of {list(_OUT + _IN)}; fix these rows{fails}",
            _not_in("decision", _OUT + _IN),
            "decision",
        ),
        (
            f"decided_by is not one of {list(_SELF + _PARENT)}; fix these rows{fails}",
            _not_in("decided_by", _SELF + _PARENT),
            "decided_by",
        ),
        (
            f"gillick_competent is not yes or no; fix these rows{fails}",
            _not_in("gillick", _TRUE + _FALSE),
            "gillick",
        ),
    ]
    select = ", ".join(f"count(*) FILTER (WHERE {cond})" for _, cond, _ in checks)
    rows, *counts = con.execute(f"SELECT count(*), {select} FROM {table}").fetchall()[0]  # noqa: S608
    findings = []
    for (what, cond, value), n in zip(checks, counts, strict=True):
        if not n:
            continue
        first = con.execute(
            f"SELECT rowid, id_text, CAST({value} AS VARCHAR) FROM {table} "  # noqa: S608
            f"WHERE {cond} ORDER BY rowid LIMIT {SHOWN_ROWS}"
        ).fetchall()
        shown = [(int(r[0]), r[1], r[2]) for r in first]
        detail = _rows_detail(con, path, int(rows), shown, int(n) - len(shown))
        findings.append(Finding(Level.ERROR, where, what, int(n), detail))
    return findings


def load_registers(con: duckdb.DuckDBPyConnection, policy: ConsentPolicy) -> list[Finding]:
    """Read every register into the temporary table consent_decisions, checking each row."""
    findings: list[Finding] = []
    for i, path in enumerate(policy.registers):
        findings += _load_one(con, path, i)
    if any(f.level is Level.ERROR for f in findings):
        return findings
    parts = [
        f"""
        SELECT {i} AS register, rowid AS row, person_id, date, source,
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
            "SELECT 0 AS register, CAST(0 AS BIGINT) AS row, CAST(NULL AS BIGINT) AS person_id, "
            "CAST(NULL AS DATE) AS date, '' AS source, '' AS decision, '' AS decided_by, "
            "false AS gillick WHERE false"
        )
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {DECISIONS_TABLE} AS {union}")
    for i in range(len(policy.registers)):
        con.execute(f"DROP TABLE consent_raw_{i}")
    return findings


def check_registers(policy: ConsentPolicy) -> list[Finding]:
    """Read and check the registers alone, on a connection of their own (milliseconds)."""
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        return load_registers(con, policy)
    finally:
        con.close()


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
               (SELECT count(*) FROM {DECISIONS_TABLE})
        """  # noqa: S608 - constant SQL
    ).fetchall()[0]
    findings = [
        Finding(
            Level.NOTE,
            "consent",
            f"{counts[2]:,} decisions read; {counts[1]:,} persons opted out"
            + (
                f"; {counts[0] - counts[1]:,} more children excluded for want of consent"
                if policy.children_need_consent
                else ""
            )
            + f"; {counts[0]:,} persons excluded from every view",
        )
    ]
    # An id that matches nobody excludes nobody: usually a register of NHS numbers, or of
    # another region, where this CDM's person_ids were meant. Said per file, with examples.
    unmatched = con.execute(
        f"""
        WITH u AS (
            SELECT register, person_id, min(row) AS first_row FROM {DECISIONS_TABLE}
            WHERE person_id NOT IN (SELECT person_id FROM {persons})
            GROUP BY register, person_id
        )
        SELECT register, count(*),
               list_slice(list(person_id ORDER BY first_row), 1, {SHOWN_ROWS})
        FROM u GROUP BY register ORDER BY register
        """  # noqa: S608 - constant SQL
    ).fetchall()
    for register, n, examples in unmatched:
        findings.append(
            Finding(
                Level.WARNING,
                f"consent register {policy.registers[register]}",
                "person_ids that match no person in the person table: their decisions "
                "exclude nobody; check that the register holds this CDM's person_ids (not "
                "NHS numbers) and is this region's",
                int(n),
                "e.g. "
                + ", ".join(str(e) for e in examples)
                + (f" and {int(n) - len(examples):,} more" if int(n) > len(examples) else ""),
            )
        )
    con.execute("DROP TABLE consent_effective")
    return findings
