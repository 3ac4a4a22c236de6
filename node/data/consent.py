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

Which decision counts (docs/data.md, "Consent and opt-outs"; the ages are configurable in
node.toml):

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
depend on them (tests/unit/test_consent_views.py proves it view by view). The register must
be readable and valid, or the node refuses to start: it fails closed, never open. person_id
is read exactly (digits only, within BIGINT), never through a floating-point or lenient cast
that could move a decision to another person (node/data/registers.py reads and checks the
files). A running node re-reads the registers when they change (register_states here, the
rebuild in node/data/store.py).
"""

from __future__ import annotations

import hashlib
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import duckdb

from node.data.findings import Finding, Level
from node.data.omop import sql_string
from node.data.registers import DECISIONS_TABLE, SHOWN_ROWS, load_registers, sql_list
from queries.errors import ConfigError

EXCLUDED_TABLE: Final = "consent_excluded"
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
            WHERE c.source IN {sql_list(sources)}
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
