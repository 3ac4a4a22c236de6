"""What a node found when it checked its data: a validation report a custodian can act on.

Every check yields a Finding that says what is wrong, where (table and column) and how many
rows it affects. Errors refuse the data (the node will not start); warnings and notes explain
what the node does about the problem. The report is for the custodian only: it never leaves
the node (Describe publishes the catalog, never this).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

from queries.errors import DataError


class Level(enum.StrEnum):
    """How serious a finding is."""

    ERROR = "error"  # the node refuses to serve this data
    WARNING = "warning"  # served, but rows are dropped or values changed: read the message
    NOTE = "note"  # for information


@dataclass(frozen=True)
class Finding:
    """One result of one check."""

    level: Level
    where: str  # "person.year_of_birth", "visit_occurrence", "consent register", ...
    message: str  # what was found and what the node does about it
    count: int | None = None  # rows (or persons) affected, where that makes sense
    # Which rows and which values (line numbers, example ids): derived from the data, so it
    # goes into the custodian's report and log but never into a message sent over the wire.
    detail: str | None = None

    def render(self) -> str:
        """One line: level, where, how many, what, and which rows."""
        many = f" [{self.count:,}]" if self.count is not None else ""
        detail = f"; {self.detail}" if self.detail else ""
        return f"{self.level.value.upper():7} {self.where}{many}: {self.message}{detail}"


@dataclass
class ValidationReport:
    """The findings of every check on one node's data, in the order they were made."""

    source: str
    findings: list[Finding] = field(default_factory=list)
    # The reference date the views use and where it came from (node/data/reference.py);
    # None until validation has got that far.
    reference_date: date | None = None
    reference_origin: str = ""
    # Optional OMOP tables absent, empty or unusable: the node serves without them.
    absent: frozenset[str] = frozenset()

    def add(self, level: Level, where: str, message: str, count: int | None = None) -> None:
        """Record one finding."""
        self.findings.append(Finding(level, where, message, count))

    def extend(self, findings: Iterable[Finding]) -> None:
        """Record several findings."""
        self.findings.extend(findings)

    @property
    def errors(self) -> list[Finding]:
        """Findings that refuse the data."""
        return [f for f in self.findings if f.level is Level.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        """Findings the custodian should read."""
        return [f for f in self.findings if f.level is Level.WARNING]

    @property
    def ok(self) -> bool:
        """True if nothing refuses the data."""
        return not self.errors

    def render(self, *, notes: bool = True) -> str:
        """The report as text, errors first."""
        order = {Level.ERROR: 0, Level.WARNING: 1, Level.NOTE: 2}
        shown = sorted(
            (f for f in self.findings if notes or f.level is not Level.NOTE),
            key=lambda f: order[f.level],
        )
        verdict = (
            "data accepted"
            if self.ok
            else f"data REFUSED: {len(self.errors)} error(s) must be fixed"
        )
        lines = [f"Validation of {self.source}: {verdict}, {len(self.warnings)} warning(s)"]
        if self.reference_date is not None:
            lines.append(
                f"  reference date {self.reference_date.isoformat()} ({self.reference_origin})"
            )
        lines += [f"  {f.render()}" for f in shown]
        return "\n".join(lines)

    def raise_if_refused(self) -> None:
        """Raise DataError carrying the report if any check refused the data."""
        if not self.ok:
            raise DataError(self.render(notes=False))
