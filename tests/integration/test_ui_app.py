"""`chc ui` against a real federation (four nodes and the hub, mTLS on loopback): every page
renders, Explain spends nothing, Run shows the table and chart and is kept in history, an
error shows its message, the auditor sees each node's ledger verified; and the command
prints its one URL line, refuses without the token and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.local.federation import AUDITOR_NAME, LocalFederation
from protocols.security.pki import Role, load_identity
from tests.unit._ui_helpers import browser, serving, ui_config

pytestmark = pytest.mark.integration

SQL = "SELECT sex, COUNT(*) FROM persons GROUP BY sex"
URL_LINE = re.compile(r"^chc ui: (http://127\.0\.0\.1:(\d+)/)\?token=([A-Za-z0-9_-]{43,})$")


@pytest.fixture(scope="module")
def base(federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = ui_config(
        tmp_path_factory.mktemp("ui"),
        hub=federation.hub_address,
        identity=load_identity(federation.analyst_identity),
        auditor=load_identity(federation.identity_dir(Role.AUDITOR, AUDITOR_NAME)),
    )
    with serving(config) as url:
        yield url


def _spent(c: httpx.Client) -> str:
    page = c.get("/fragments/nodes").text
    return "".join(re.findall(r'<td class="num">([0-9.e-]+) / ', page))


def test_the_federation_page_lists_every_node_with_its_catalog(
    base: str, federation: LocalFederation
) -> None:
    names = sorted(s.name for s in federation.nodes)
    with browser(base) as c:
        page = c.get("/").text
        fragment = c.get("/fragments/nodes").text
    for name in names:
        assert f'<tr data-node="{name}" data-status="ok">' in page
        assert f'<details class="catalog" data-node="{name}">' in page
        assert f'<tr data-node="{name}" data-status="ok">' in fragment
    assert '<table id="nodes">' in fragment
    assert "<html" not in fragment
    assert 'src="/static/chc.js"' in page
    assert "<header" in page
    assert "<nav" in page


def test_explain_spends_nothing_and_run_shows_table_chart_and_history(base: str) -> None:
    with browser(base) as c:
        form = c.get("/query").text
        for marker in ('id="query-form"', 'id="sql"', 'id="rho"', 'id="explain"', 'id="run"'):
            assert marker in form
        assert '<aside id="catalog"' in form
        assert '<label for="sql">' in form
        before = _spent(c)
        explain = c.post(
            "/query",
            data={"sql": SQL, "rho": "0.01", "action": "explain"},
            headers={"origin": base},
        )
        assert explain.status_code == 200, explain.text
        assert 'id="explain-result"' in explain.text
        assert 'id="result"' not in explain.text
        assert _spent(c) == before
        run = c.post(
            "/query", data={"sql": SQL, "rho": "0.01", "action": "run"}, headers={"origin": base}
        )
        assert run.status_code == 200, run.text
        page = run.text
        assert 'id="result-table"' in page
        assert 'class="chc-chart"' in page
        assert '<tr data-region="All regions"' in page
        assert 'class="pooled"' in page
        assert _spent(c) != before
        entry_id = re.search(r'id="history-link" href="/history/(\d+)"', page)
        assert entry_id is not None
        reopened = c.get(f"/history/{entry_id.group(1)}").text
        # The same rows and bars as when it ran (the chart ids differ per drawing).
        assert reopened.count("<tr data-region=") == page.count("<tr data-region=")
        assert reopened.count('<rect class="bar') == page.count('<rect class="bar') > 0
        assert f'<tr data-entry="{entry_id.group(1)}"' in c.get("/history").text


def test_a_pooled_only_query_compares_both_noises_then_releases_only_pooled_rows(
    base: str, federation: LocalFederation
) -> None:
    """Ticking 'Pooled only': Explain shows the guarantee and, per component, the per-node
    and secure-aggregation noise; Run releases the pooled rows alone with the guarantee
    stated, and the history entry re-opens with it."""
    k = len(federation.nodes)
    form = {"sql": SQL, "rho": "0.01", "pooled_only": "on"}
    with browser(base) as c:
        assert 'id="pooled_only"' in c.get("/query").text
        before = _spent(c)
        explain = c.post("/query", data={**form, "action": "explain"}, headers={"origin": base})
        assert explain.status_code == 200, explain.text
        assert _spent(c) == before
        page = explain.text
        assert f"secure aggregation over {k} nodes (shares assume all {k} honest)" in page
        ratios = [float(r) for r in re.findall(r'<td class="num ratio">([0-9.]+)', page)]
        # Per-node noise summed over k nodes is sqrt(k) wider than one shared noise (each
        # share's rounding and upscale cost a few percent, KLS21).
        assert ratios, page
        assert all(abs(r / k**0.5 - 1) < 0.15 for r in ratios), ratios
        assert "checked" in re.search(r'<input type="checkbox" id="pooled_only"[^>]*>', page)[0]

        run = c.post("/query", data={**form, "action": "run"}, headers={"origin": base})
        assert run.status_code == 200, run.text
        page = run.text
        assert 'id="secure-guarantee"' in page
        regions = set(re.findall(r'<tr data-region="([^"]+)"', page))
        assert regions == {"All regions"}, regions
        assert _spent(c) != before
        entry = re.search(r'id="history-link" href="/history/(\d+)"', page)
        assert entry is not None
        reopened = c.get(f"/history/{entry.group(1)}").text
        assert 'id="secure-guarantee"' in reopened
        assert f"secure aggregation over {k} nodes" in reopened

        honest_alone = c.post(
            "/query",
            data={"sql": SQL, "rho": "0.01", "honest_nodes": "2", "action": "explain"},
            headers={"origin": base},
        )
        too_many = c.post(
            "/query",
            data={**form, "honest_nodes": str(k + 1), "action": "explain"},
            headers={"origin": base},
        )
        not_whole = c.post(
            "/query",
            data={**form, "honest_nodes": "two", "action": "explain"},
            headers={"origin": base},
        )
    assert honest_alone.status_code == 400
    assert "only applies to a pooled-only query" in honest_alone.text
    assert too_many.status_code == 400
    assert f"honest_nodes {k + 1} is more than the {k} nodes" in too_many.text
    assert not_whole.status_code == 400
    assert "is not a whole number" in not_whole.text


def test_a_refused_query_shows_its_message_without_a_traceback(base: str) -> None:
    with browser(base) as c:
        bad = c.post(
            "/query",
            data={"sql": "SELECT person_id FROM persons", "rho": "0.01", "action": "run"},
            headers={"origin": base},
        )
        not_a_number = c.post(
            "/query",
            data={"sql": SQL, "rho": "lots", "action": "explain"},
            headers={"origin": base},
        )
    assert bad.status_code == 400
    assert '<div id="error" role="alert">' in bad.text
    assert "Traceback" not in bad.text
    assert not_a_number.status_code == 400
    assert "is not a number" in not_a_number.text
    # The form keeps what was typed, so the analyst can fix it.
    assert "SELECT person_id FROM persons" in bad.text


def test_the_auditor_sees_every_ledger_verified(base: str, federation: LocalFederation) -> None:
    with browser(base) as c:
        page = c.get("/audit").text
    for s in federation.nodes:
        row = re.search(rf'<tr data-node="{s.name}" data-verified="(\w+)">(.*?)</tr>', page, re.S)
        assert row is not None, s.name
        assert row.group(1) == "true"
        assert "verified" in row.group(2)
    assert page.count('class="chc-spend"') == 2


MODEL_FORM = {
    "form": "model",
    "view": "persons",
    "outcome": "deceased",
    "family": "binomial",
    "covariate": ["sex"],
    # The unknown level of sex is too small for the nodes' [models] policy: fit without it.
    "where": "sex=female,male",
    "rho": "0.5",
}


def test_a_fit_and_a_comparison_render_their_tables_and_plots_and_reopen(
    base: str, federation: LocalFederation
) -> None:
    names = sorted(s.name for s in federation.nodes)
    with browser(base) as c:
        page = c.get("/models?view=persons").text
        assert '<form id="model-form"' in page
        assert '<form id="compare-form"' in page
        # The pathway's public columns are offered, and identifiers are not.
        assert 'id="covariate-sex"' in page
        assert 'id="covariate-person_id"' not in page
        before = _spent(c)
        explain = c.post(
            "/models", data={**MODEL_FORM, "action": "explain"}, headers={"origin": base}
        )
        assert explain.status_code == 200, explain.text
        assert explain.text.count('<tr data-node="') == len(names)
        assert _spent(c) == before
        fitted = c.post("/models", data={**MODEL_FORM, "action": "fit"}, headers={"origin": base})
        assert fitted.status_code == 200, fitted.text
        terms = re.findall(r'<tr data-term="([^"]+)"', fitted.text)
        assert terms == ["(intercept)", "sex[male]"]
        assert re.findall(r'<g class="term" data-term="([^"]+)"', fitted.text) == ["sex[male]"]
        assert _spent(c) != before
        compared = c.post(
            "/models/compare",
            data={**MODEL_FORM, "form": "compare", "adjust": ["sex"], "action": "compare"},
            headers={"origin": base},
        )
        assert compared.status_code == 200, compared.text
        units = re.findall(
            r'<tr data-unit="([^"]+)" data-flag="(outlier|alert|none)"', compared.text
        )
        assert sorted(u for u, _ in units) == names
        assert 'id="funnel-plot"' in compared.text
        listed = c.get("/history").text
        kinds = dict(
            re.findall(r'<tr data-entry="(\d+)" data-status="\w+" data-kind="(\w+)"', listed)
        )
        model_id = re.search(r'id="history-link" href="/history/(\d+)"', fitted.text)
        assert model_id is not None
        assert kinds[model_id.group(1)] == "model"
        assert "comparison" in kinds.values()
        reopened = c.get(f"/history/{model_id.group(1)}").text
        assert re.findall(r'<tr data-term="([^"]+)"', reopened) == terms
        exported = c.get(f"/history/{model_id.group(1)}.csv").text.splitlines()
        assert [line.split(",")[0] for line in exported[1:]] == [f'"{t}"' for t in terms]


def test_chc_ui_prints_its_url_refuses_without_token_and_exits_0_on_sigterm(
    federation: LocalFederation, tmp_path: Path
) -> None:
    command = [
        *(sys.executable, "-m", "coordinator", "ui", "--port", "0", "--no-browser"),
        *("--hub", federation.hub_address, "--identity", str(federation.analyst_identity)),
        *("--history", str(tmp_path / "history.sqlite")),
    ]
    env = {**os.environ, "HOME": str(tmp_path)}  # no demo state: only the flags count
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            line = proc.stdout.readline().decode().rstrip("\n")
            match = URL_LINE.match(line)
            assert match is not None, (line, proc.stderr.read().decode() if proc.poll() else "")
            root, token = match.group(1), match.group(3)
            with httpx.Client(follow_redirects=False, timeout=30) as c:
                assert c.get(root).status_code == 403
                signed_in = c.get(f"{root}?token={token}")
                assert signed_in.status_code == 303
                assert signed_in.headers["location"] == "/"
                assert c.get(f"{root}history").status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert proc.stdout.read() == b""  # the URL line is the only line on stdout
        finally:
            if proc.poll() is None:
                proc.kill()
