"""`chc query --pooled-only [--honest-nodes T]`: usage errors, what is signed, what is shown.

Usage errors are checked before anything is asked (the hub is a closed loopback port). The
rest runs the real `chc` app against the recording hub of test_pooled_only_client.py (real
mutual TLS), which lists gm, leeds and york and answers with a secure aggregate.
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import Result
from rich.console import Console

from coordinator.analyst import report
from coordinator.analyst.cli import _with_secure_aggregation
from coordinator.analyst.client import load_envelope
from protocols import serde
from protocols.cli import ExitCode
from queries.combine import POOLED
from queries.spec import MAX_HONEST_NODES, Query
from queries.spec_io import from_json
from tests.unit import test_pooled_only_client as recorded
from tests.unit._cli_helpers import chc, error_line
from tests.unit._present_helpers import federated
from tests.unit.test_pooled_only_client import (
    POOLED_QUERY,
    RecordingHub,
    Setup,
    guarantee,
    secure_explanation,
    secure_result,
)

# The recording hub's fixtures, shared with the client's tests (each module starts its own).
setup = recorded.setup
hub = recorded.hub

QUERY = ("query", "--view", "persons", "--rho", "0.1")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def closed(setup: Setup) -> list[str]:
    """--hub at a closed port, with a valid analyst identity."""
    return ["--hub", f"127.0.0.1:{_closed_port()}", "--identity", str(setup.pki / "alice")]


@pytest.fixture
def at_hub(setup: Setup) -> list[str]:
    """--hub at the recording hub, with a valid analyst identity."""
    return ["--hub", setup.fed.hub, "--identity", str(setup.pki / "alice")]


def _text(run: Result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(run.output.split())


# ---- usage errors ---------------------------------------------------------------------------


def test_honest_nodes_without_pooled_only_is_a_usage_error(closed: list[str]) -> None:
    run = chc(*QUERY, "--honest-nodes", "2", *closed)
    assert run.exit_code == ExitCode.USAGE
    assert "--honest-nodes goes with --pooled-only" in error_line(run)


@pytest.mark.parametrize("value", ["0", "-1", str(MAX_HONEST_NODES + 1)])
def test_honest_nodes_out_of_range_is_a_usage_error_naming_the_flag(
    value: str, closed: list[str]
) -> None:
    run = chc(*QUERY, "--pooled-only", "--honest-nodes", value, *closed)
    assert run.exit_code == ExitCode.USAGE
    assert f"--honest-nodes {value} is out of range" in error_line(run)


def test_honest_nodes_that_is_not_a_number_is_a_usage_error(closed: list[str]) -> None:
    run = chc(*QUERY, "--pooled-only", "--honest-nodes", "three", *closed)
    assert run.exit_code == ExitCode.USAGE
    assert "--honest-nodes" in run.output


def test_honest_nodes_differing_from_the_spec_is_a_usage_error(
    tmp_path: Path, closed: list[str]
) -> None:
    spec = tmp_path / "q.yaml"
    spec.write_text("view: persons\nrho: 0.1\npooled_only: true\nhonest_nodes: 3\n")
    run = chc("query", "--spec", str(spec), "--honest-nodes", "2", *closed)
    assert run.exit_code == ExitCode.USAGE
    assert "differs from the query's own honest_nodes 3" in error_line(run)


def test_resend_takes_no_pooled_only(tmp_path: Path, closed: list[str]) -> None:
    for extra in (["--pooled-only"], ["--honest-nodes", "2"]):
        run = chc("query", "--resend", str(tmp_path / "none"), *extra, *closed)
        assert run.exit_code == ExitCode.USAGE
        assert "--resend FILE reads the query from the envelope" in error_line(run)


def test_the_flags_set_the_spec_fields() -> None:
    plain = Query(view="persons", rho=0.1)
    assert _with_secure_aggregation(plain, False, None) is plain
    assert _with_secure_aggregation(plain, True, None) == replace(plain, pooled_only=True)
    assert _with_secure_aggregation(plain, True, 2) == replace(
        plain, pooled_only=True, honest_nodes=2
    )
    # A spec that is pooled_only already takes --honest-nodes alone, and keeps its own.
    assert _with_secure_aggregation(POOLED_QUERY, False, 3).honest_nodes == 3
    own = replace(POOLED_QUERY, honest_nodes=3)
    assert _with_secure_aggregation(own, True, None) == own


# ---- against the recording hub ------------------------------------------------------------


def test_a_pooled_only_query_is_signed_for_the_nodes_and_shows_the_guarantee(
    hub: RecordingHub, at_hub: list[str]
) -> None:
    run = chc(*QUERY, "--pooled-only", "--honest-nodes", "2", *at_hub)
    assert run.exit_code == 0, run.output
    [request] = hub.submits
    signed = serde.signed_query_from_proto(request.envelope)
    assert signed.audience.nodes == ("gm", "leeds", "york")
    sent = from_json(signed.query)
    assert (sent.pooled_only, sent.honest_nodes) == (True, 2)
    text = _text(run)
    assert (
        "Secure aggregation over 2 nodes (shares assume both honest): rho 0.1; "
        "the hub saw only the masked vectors and their sum"
    ) in text
    assert "All regions" in text
    # The nodes table: each node's charge, as for any query.
    assert "rho spent: 0.2 in all at the nodes that answered" in text


def test_a_pooled_only_spec_file_runs_as_secure_aggregation(
    tmp_path: Path, hub: RecordingHub, at_hub: list[str]
) -> None:
    spec = tmp_path / "q.json"
    spec.write_text(json.dumps({"view": "persons", "rho": 0.1, "pooled_only": True}))
    run = chc("query", "--spec", str(spec), "--honest-nodes", "3", *at_hub)
    assert run.exit_code == 0, run.output
    sent = from_json(hub.submits[0].envelope.query)
    assert (sent.pooled_only, sent.honest_nodes) == (True, 3)
    assert serde.signed_query_from_proto(hub.submits[0].envelope).audience.nodes == (
        "gm",
        "leeds",
        "york",
    )


def test_the_json_of_a_secure_aggregate_has_its_guarantee(
    hub: RecordingHub, at_hub: list[str]
) -> None:
    run = chc(*QUERY, "--pooled-only", "--json", *at_hub)
    assert run.exit_code == 0, run.output
    assert len(hub.submits) == 1
    out = json.loads(run.output)
    g = out["secure_aggregation"]
    assert (g["nodes"], g["threshold"], g["rho_threshold"]) == (2, 2, 0.1)
    assert g["round"] == ["n0", "n1"]
    assert [c["component"] for c in g["components"]] == ["persons"]
    assert g["components"][0]["pooled_noise_sd"] == pytest.approx(5.0)
    assert {r["region"] for r in out["rows"]} == {POOLED}
    assert out["query"]["pooled_only"] is True


def test_the_json_of_other_results_is_unchanged() -> None:
    plain = federated({"leeds": [40, 60], "york": [20, 30]})
    assert "secure_aggregation" not in report.result_to_dict(plain, Query("persons", 0.1))


def test_save_envelope_of_a_pooled_only_query_names_the_nodes(
    tmp_path: Path, hub: RecordingHub, at_hub: list[str]
) -> None:
    saved = tmp_path / "envelope.bin"
    run = chc(*QUERY, "--pooled-only", "--save-envelope", str(saved), *at_hub)
    assert run.exit_code == 0, run.output
    envelope = load_envelope(saved)
    assert list(envelope.audience.nodes) == ["gm", "leeds", "york"]
    assert envelope == hub.submits[0].envelope


def test_explain_of_a_pooled_only_query_compares_both_pooled_noises(
    hub: RecordingHub, at_hub: list[str]
) -> None:
    run = chc(*QUERY, "--pooled-only", "--explain", *at_hub)
    assert run.exit_code == 0, run.output
    assert serde.signed_query_from_proto(hub.explains[0].envelope).audience.nodes == (
        "gm",
        "leeds",
        "york",
    )
    assert not hub.submits
    text = _text(run)
    assert "Plan for persons (pooled only, by secure aggregation)" in text
    assert "Pooled noise sd: per-node noise or secure aggregation" in text
    # 4 nodes of variance 25 each pool to sd 10; the secure sum's sd is 5.
    assert "│ persons │ count │ 10 (4 nodes) │ 5 │ 2x │" in text
    assert "the hub would see only the masked vectors and their sum" in text


def test_explain_json_of_a_pooled_only_query_has_the_secure_noise(
    hub: RecordingHub, at_hub: list[str]
) -> None:
    run = chc(*QUERY, "--pooled-only", "--explain", "--json", *at_hub)
    assert run.exit_code == 0, run.output
    assert len(hub.explains) == 1
    nodes = json.loads(run.output)
    assert [c["pooled_noise_sd"] for c in nodes[0]["secure_components"]] == [5.0]
    assert nodes[0]["secure_aggregation"]["nodes"] == 4
    assert "secure_components" not in nodes[-1]  # the node that refused


def test_explain_of_other_queries_shows_no_comparison() -> None:
    console = Console(record=True, width=120)
    plain = [replace(e, secure_measures=(), secure_aggregation=None) for e in secure_explanation()]
    report.print_explain(console, plain, Query("persons", 0.1))
    assert "Pooled noise sd" not in console.export_text()
    assert "secure_components" not in report.explain_to_dict(plain[0])


def test_a_guarantee_below_every_node_gives_both_rhos() -> None:
    console = Console(record=True, width=300)
    result = replace(secure_result(), secure_aggregation=guarantee(4, 3))
    report.print_result(console, result, POOLED_QUERY)
    assert (
        "Secure aggregation over 4 nodes (shares assume 3 honest): rho 0.1 if only 3 are "
        "honest, 0.075 if all are; the hub saw only the masked vectors and their sum"
    ) in console.export_text()


def test_a_pooled_only_query_over_one_node_is_refused_before_signing(
    hub: RecordingHub, at_hub: list[str]
) -> None:
    hub.listed = ["leeds"]
    run = chc(*QUERY, "--pooled-only", *at_hub)
    assert run.exit_code == ExitCode.REFUSED
    assert "secure aggregation needs at least 2 nodes; the hub lists 1 (leeds)" in error_line(run)
    run = chc(*QUERY, "--pooled-only", "--explain", *at_hub)
    assert run.exit_code == ExitCode.REFUSED
    assert not hub.submits
    assert not hub.explains


def test_more_honest_nodes_than_nodes_is_refused(hub: RecordingHub, at_hub: list[str]) -> None:
    run = chc(*QUERY, "--pooled-only", "--honest-nodes", "4", *at_hub)
    assert run.exit_code == ExitCode.REFUSED
    assert "honest_nodes 4 is more than the 3 nodes of the query (gm, leeds, york)" in (
        error_line(run)
    )
    assert not hub.submits
