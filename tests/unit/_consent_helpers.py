"""Helpers shared by the consent tests: writing a register file and reading who is included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.data.consent import ConsentPolicy
from node.data.store import OmopStore
from tests.unit.omop_testdata import REF

HEADER = ("person_id", "date", "source", "decision", "decided_by", "gillick_competent")


def register(path: Path, rows: list[tuple[Any, ...]], header: tuple[str, ...] = HEADER) -> Path:
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def included(source: Path, policy: ConsentPolicy) -> set[int]:
    store = OmopStore(source, [], reference_date=REF, threads=1, consent=policy)
    try:
        return {r["person_id"] for r in store.query("SELECT person_id FROM persons").to_pylist()}
    finally:
        store.close()
