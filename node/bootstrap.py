"""`chc-node init`: write a node.toml for a custodian's OMOP data and check the data.

The node.toml written here is complete and commented: the custodian reviews it (pathways,
budget, consent registers), puts the node's certificate in the identity folder (`chc pki
issue --role node`) and starts the node with `chc-node serve --config DIR/node.toml`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path

import duckdb

from node.config import load_config
from node.data.consent import ConsentPolicy, consent_toml
from node.data.findings import Level, ValidationReport
from node.data.omop import open_source, sql_string
from node.data.tables import OMOP_TABLES
from node.data.validate import DataSettings, validate
from queries.errors import ConfigError
from queries.pathway import builtin_pathways, load_pathways
from queries.spec import check_identifier

# The synthetic generator writes this lookup beside its tables; a custodian's own lookup is
# given with --imd-lookup.
SIDE_LOOKUP = "lsoa_imd.csv"
CONFIG_FILE = "node.toml"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def node_toml(
    *,
    name: str,
    omop: Path,
    identity: str,
    listen: str,
    reference_date: date | None,
    pathways: Sequence[str],
    imd_lookup: Path | None,
    omop_schema: str | None,
    consent: ConsentPolicy,
    derived: date | None = None,
) -> str:
    """The text of a node.toml with these settings and the default budget.

    Without a reference_date the line is written commented out, with `derived` (the end of
    the data, which is the default) as its value, so that the date follows the data."""
    names = ", ".join(_toml_str(p) for p in pathways)
    if reference_date is not None:
        ref_line = (
            f"reference_date = {reference_date.isoformat()}        # ages and windows end here"
        )
    else:
        shown = derived.isoformat() if derived is not None else "2025-12-31"
        ref_line = (
            f"# reference_date = {shown}      # ages and windows end here; default: the end of "
            "the data, rounded up to a month end (docs/data.md)"
        )
    lines = [
        f"# chc node configuration, written by `chc-node init` on {date.today().isoformat()}.",
        "# Review it, then: chc-node check --config node.toml; chc-node serve --config node.toml",
        f"name = {_toml_str(name)}                  # must match the node certificate's name",
        f"omop = {_toml_str(str(omop))}   # read in place, never written",
        f"identity = {_toml_str(identity)}           # cert.pem, key.pem (0600), ca.pem",
        f"listen = {_toml_str(listen)}",
        ref_line,
        f"pathways = [{names}]",
        '# pathways_dir = "pathways"  # your pathway files (*.yaml): add to or replace the library',
    ]
    if imd_lookup is not None:
        lines.append(f"imd_lookup = {_toml_str(str(imd_lookup))}  # LSOA code -> IMD quintile")
    else:
        lines.append('# imd_lookup = "lsoa_imd.csv"   # LSOA code -> IMD quintile (docs/data.md)')
    if omop_schema is not None:
        lines.append(f"omop_schema = {_toml_str(omop_schema)}")
    lines += [
        "",
        "[budget]",
        "total_rho = 10.0                   # the node's total zCDP budget per period",
        "# lifetime_rho = 50.0              # over the node's life (default 5 x total_rho)",
        "max_rho_per_query = 1.0",
        "delta = 1e-6                       # for reporting (epsilon, delta) equivalents",
        "",
        consent_toml(consent),
    ]
    return "\n".join(lines)


def copy_source(source: Path, target: Path, *, omop_schema: str | None = None) -> dict[str, int]:
    """Typed Parquet copies of the OMOP columns the node reads; returns rows per table."""
    con = duckdb.connect(":memory:", config={"threads": 2})
    try:
        found = open_source(con, source, schema=omop_schema)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        counts: dict[str, int] = {}
        for req in OMOP_TABLES:
            table = found.table(req.name)
            if table is None:
                continue
            select = ", ".join(
                f"{table.typed(c)} AS {c.name}" for c in req.columns if table.has(c.name)
            )
            out = target / f"{req.name}.parquet"
            con.execute(
                f"COPY (SELECT {select} FROM {table.relation}) "  # noqa: S608 - quoted
                f"TO {sql_string(str(out))} (FORMAT parquet)"
            )
            counts[req.name] = int(
                con.execute(
                    f"SELECT count(*) FROM read_parquet({sql_string(str(out))})"  # noqa: S608
                ).fetchall()[0][0]
            )
        return counts
    finally:
        con.close()


def init_node(
    directory: Path,
    *,
    name: str,
    omop: Path,
    imd_lookup: Path | None = None,
    registers: Sequence[Path] = (),
    reference_date: date | None = None,
    pathways: Sequence[str] | None = None,
    listen: str = "0.0.0.0:50051",
    omop_schema: str | None = None,
    force: bool = False,
    copy: bool = False,
) -> tuple[Path, ValidationReport]:
    """Write directory/node.toml and check the data; the report says if it is refused.

    The node reads the data in place. With copy=True, if the data is accepted, the columns
    the node reads are first copied, typed, to directory/omop/*.parquet and node.toml points
    there (faster start-up from CSV exports; the copy holds patient data like the source).
    """
    try:
        check_identifier(name.replace("-", "_"), "node name")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    config = directory / CONFIG_FILE
    if config.exists() and not force:
        raise ConfigError(f"{config} exists; pass --force to overwrite it")
    if not omop.exists():
        raise ConfigError(f"--omop {omop} does not exist")
    omop = omop.resolve()
    notes: list[str] = []
    if imd_lookup is None and omop.is_dir() and (omop / SIDE_LOOKUP).is_file():
        imd_lookup = omop / SIDE_LOOKUP
        notes.append(f"found {imd_lookup} beside the tables: used as imd_lookup")
    if imd_lookup is not None:
        imd_lookup = imd_lookup.resolve()
    chosen = list(pathways) if pathways is not None else list(builtin_pathways())
    served = load_pathways(chosen)
    consent = ConsentPolicy(registers=tuple(r.resolve() for r in registers))
    directory.mkdir(parents=True, exist_ok=True)
    if copy:
        first = validate(
            DataSettings(
                omop=omop,
                reference_date=reference_date,
                imd_lookup=imd_lookup,
                consent=consent,
                omop_schema=omop_schema,
            ),
            served,
        )
        if not first.ok:
            return config, first  # nothing copied, no node.toml: fix the data first
        target = directory / "omop"
        counts = copy_source(omop, target, omop_schema=omop_schema)
        notes.append(
            f"copied {', '.join(f'{t} ({n:,} rows)' for t, n in counts.items())} from {omop} "
            f"to {target}: node.toml reads the copy; protect it like the source"
        )
        omop, omop_schema = target.resolve(), None

    def text(derived: date | None = None) -> str:
        return node_toml(
            name=name,
            omop=omop,
            identity="identity",
            listen=listen,
            reference_date=reference_date,
            pathways=chosen,
            imd_lookup=imd_lookup,
            omop_schema=omop_schema,
            consent=consent,
            derived=derived,
        )

    config.write_text(text(), encoding="utf-8")
    cfg = load_config(config)  # what we wrote must read back
    report = validate(
        DataSettings(
            omop=cfg.omop,
            reference_date=cfg.reference_date,
            imd_lookup=cfg.imd_lookup,
            consent=cfg.consent,
            omop_schema=cfg.omop_schema,
        ),
        served,
    )
    if reference_date is None:
        # The same settings; only the comment now shows the date the data gave.
        config.write_text(text(report.reference_date), encoding="utf-8")
    for note in notes:
        report.add(Level.NOTE, "init", note)
    return config, report
