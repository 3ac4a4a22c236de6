"""Ad hoc cohorts end to end: a real federation on loopback, nodes in different formats.

Four synthetic regions: nenc reads Parquet (with a concept_ancestor table), nwc CSV (without
one), yh a DuckDB file (with one), and gm Parquet under the default policy, which answers no
ad hoc cohort. The pooled counts of condition cohorts, with and without descendants, are
checked against exact SQL written by hand on the regions' files (not the node's views), and
gm's refusal is PERMISSION_DENIED and costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from statistics import NormalDist

import duckdb
import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from coordinator.local.synth.omop import COPD, TYPE_2_DIABETES
from protocols import serde
from protocols.security.envelope import sign_query
from protocols.security.pki import load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.cohort import Allow
from queries.combine import POOLED
from queries.results import NodeStatus
from queries.spec import canonical_bytes
from queries.sql import parse_sql

pytestmark = pytest.mark.integration

PERSONS = 20_000
# A grouping concept that no record uses: only its descendants (COPD and type 2 diabetes, in
# the tests' own concept_ancestor) are recorded.
PARENT = 40_000_001
ANCESTORS = pa.table(
    {
        "ancestor_concept_id": [PARENT, PARENT, PARENT, COPD],
        "descendant_concept_id": [PARENT, COPD, TYPE_2_DIABETES, COPD],
    }
)
ANSWERING = ("nenc", "nwc", "yh")
WITH_ANCESTOR = ("nenc", "yh")
ANY = '[cohorts]\nallow = "any"\n'


def _as_csv(parquet: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for f in parquet.glob("*.parquet"):
        duckdb.execute(
            f"COPY (SELECT * FROM read_parquet('{f}')) TO '{out / (f.stem + '.csv')}' (HEADER)"  # noqa: S608
        )
    return out


def _as_duckdb(parquet: Path, out: Path) -> Path:
    con = duckdb.connect(str(out))
    for f in parquet.glob("*.parquet"):
        con.execute(f"CREATE TABLE {f.stem} AS SELECT * FROM read_parquet('{f}')")  # noqa: S608
    con.register("ancestors", ANCESTORS)
    con.execute("CREATE TABLE concept_ancestor AS SELECT * FROM ancestors")
    con.close()
    return out


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("cohorts")
    folders = synth.generate_federation(PERSONS, root / "data", seed=11)
    pq.write_table(ANCESTORS, folders["nenc"] / "concept_ancestor.parquet")
    omop = {
        "nenc": folders["nenc"],
        "nwc": _as_csv(folders["nwc"], root / "nwc-csv"),
        "yh": _as_duckdb(folders["yh"], root / "yh.duckdb"),
        "gm": folders["gm"],
    }
    setups = tuple(
        NodeSetup(name=n, omop=omop[n], extra_toml=ANY if n in ANSWERING else "") for n in omop
    )
    with LocalFederation(workdir=root, nodes=setups, deadline_ms=20_000) as federation:
        federation.folders = folders  # type: ignore[attr-defined]  # the Parquet originals
        yield federation


def _exact(folder: Path, concepts: list[int], age_min: int) -> dict[str, int]:
    """Persons by sex with a condition record in `concepts` on or before the reference date,
    aged age_min+ at the reference date (or death), alive when the 365-day window opens:
    the cohort's definition (docs/data.md), on the raw files."""
    ref = "DATE '2025-12-31'"
    listed = ", ".join(str(c) for c in concepts)
    rows = duckdb.execute(
        f"""
        WITH p AS (
            SELECT person_id, gender_concept_id,
                   make_date(year_of_birth, coalesce(month_of_birth, 7),
                             coalesce(day_of_birth, 1)) AS birth
            FROM read_parquet('{folder / "person.parquet"}')
        ),
        d AS (SELECT person_id, min(death_date) AS death
              FROM read_parquet('{folder / "death.parquet"}') GROUP BY 1),
        pp AS (
            SELECT p.person_id, p.birth,
                   CASE p.gender_concept_id WHEN 8532 THEN 'female' WHEN 8507 THEN 'male'
                        ELSE 'unknown' END AS sex,
                   CASE WHEN d.death BETWEEN p.birth AND {ref} THEN d.death END AS death
            FROM p LEFT JOIN d USING (person_id) WHERE p.birth <= {ref}
        ),
        m AS (SELECT DISTINCT person_id
              FROM read_parquet('{folder / "condition_occurrence.parquet"}')
              WHERE condition_concept_id IN ({listed}) AND condition_start_date <= {ref})
        SELECT sex, count(*) FROM pp JOIN m USING (person_id)
        WHERE (death IS NULL OR death >= {ref} - 364)
          AND least(date_sub('year', birth, coalesce(death, {ref})), 120) >= {age_min}
        GROUP BY sex
        """  # noqa: S608 - the tests' own paths and numbers
    ).fetchall()
    return {str(sex): int(n) for sex, n in rows}


def _check_pooled(federation: LocalFederation, sql: str, exact: dict[str, int]) -> None:
    """The pooled estimate of every sex is within z * se (+ rounding) of the exact count.

    z keeps the chance of any of the query's cells falling outside by chance below 1e-6 in
    all (union bound over every row; discrete Gaussian tails are sub-Gaussian with parameter
    sigma). Shown counts are rounded to 5, which moves them by at most 2.5 more.
    """
    with Federation(federation.hub_address, federation.analyst_identity) as client:
        before = {b.node: b.budget.rho_spent for b in client.nodes()[0]}
        result = client.query(parse_sql(sql, rho=0.05))
        after = {b.node: b.budget.rho_spent for b in client.nodes()[0]}
    status = {o.node: o.status for o in result.nodes}
    assert status == {"nenc": NodeStatus.OK, "nwc": NodeStatus.OK, "yh": NodeStatus.OK} | {
        "gm": NodeStatus.REFUSED
    }
    gm = next(o for o in result.nodes if o.node == "gm")
    assert "does not answer ad hoc cohorts" in gm.message
    assert result.partial
    assert after["gm"] == pytest.approx(before["gm"])  # the refusal cost nothing
    for n in ANSWERING:
        assert after[n] == pytest.approx(before[n] + 0.05, rel=1e-6)
    rows = result.table.to_pylist()
    z = NormalDist().inv_cdf(1 - 1e-6 / (2 * len(rows)))
    pooled = {r["sex"]: r for r in rows if r["region"] == POOLED}
    for sex in ("female", "male"):
        row, truth = pooled[sex], exact.get(sex, 0)
        assert truth > 50, (sex, truth)  # the seeded regions have many such persons
        assert not row["suppressed"]
        assert abs(row["estimate"] - truth) <= z * row["std_error"] + 2.5, (row, truth)
        assert math.isfinite(row["std_error"])
        assert row["std_error"] > 0


def _sum(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for sex, n in c.items():
            total[sex] = total.get(sex, 0) + n
    return total


def test_a_condition_cohort_without_descendants(fed: LocalFederation) -> None:
    folders = fed.folders  # type: ignore[attr-defined]
    exact = _sum([_exact(folders[n], [COPD], 40) for n in ANSWERING])
    sql = (
        f"SELECT sex, COUNT(*) FROM cohort(conditions => [{COPD}], descendants => false, "  # noqa: S608
        "age_min => 40) GROUP BY sex"
    )
    _check_pooled(fed, sql, exact)


def test_a_condition_cohort_with_descendants(fed: LocalFederation) -> None:
    """PARENT's descendants at the nodes with concept_ancestor; PARENT alone (no one) at nwc,
    whose Explain says so."""
    folders = fed.folders  # type: ignore[attr-defined]
    exact = _sum(
        [_exact(folders[n], [PARENT, COPD, TYPE_2_DIABETES], 18) for n in WITH_ANCESTOR]
        + [_exact(folders["nwc"], [PARENT], 18)]
    )
    sql = (
        f"SELECT sex, COUNT(*) FROM cohort(conditions => [{PARENT}], descendants => true, "  # noqa: S608
        "age_min => 18) GROUP BY sex"
    )
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        explained = {e.node: e for e in client.explain(parse_sql(sql, rho=0.05))}
    assert "no concept_ancestor table" in explained["nwc"].plan
    assert "no concept_ancestor" not in explained["nenc"].plan
    assert "ad hoc cohort" in explained["yh"].plan
    assert explained["gm"].status is NodeStatus.REFUSED
    _check_pooled(fed, sql, exact)


def test_a_forbidding_node_refuses_with_permission_denied_at_no_cost(
    fed: LocalFederation,
) -> None:
    analyst = load_identity(fed.analyst_identity)
    channel = secure_channel(f"127.0.0.1:{fed.node_port('gm')}", analyst, server_name="gm")
    stub = node_pb2_grpc.NodeStub(channel)
    try:
        spent = stub.Describe(node_pb2.DescribeRequest(), timeout=10).budget.rho_spent
        sql = f"SELECT COUNT(*) FROM cohort(conditions => [{COPD}])"  # noqa: S608
        query = parse_sql(sql, rho=0.1)
        signed = sign_query(analyst, canonical_bytes(query))
        request = node_pb2.ExecuteRequest(envelope=serde.signed_query_to_proto(signed))
        for call in (stub.Explain, stub.Execute):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "node.toml [cohorts]" in (info.value.details() or "")
        after = stub.Describe(node_pb2.DescribeRequest(), timeout=10).budget.rho_spent
        assert after == pytest.approx(spent)
    finally:
        channel.close()


def test_every_node_publishes_which_ad_hoc_cohorts_it_answers(fed: LocalFederation) -> None:
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        found, missing = client.nodes()
    assert missing == []
    policies = {d.node: d.cohorts.allow for d in found}
    assert policies == {n: Allow.ANY for n in ANSWERING} | {"gm": Allow.NONE}
