"""The result chart's markup (queries/present/chart.py): the contract the UI and its browser
tests select by (/work docs: ui contract, "Chart markup"), parsed as XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from queries.combine import POOLED
from queries.errors import QueryError
from queries.results import ReleaseRules
from queries.spec import Statistic
from tests.unit._present_helpers import federated

SVG = "{http://www.w3.org/2000/svg}"
NO_RULES = ReleaseRules(suppress_below=0, round_to=1)


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # noqa: S314 (our own output, parsed to check it is well formed)


def _classes(e: ET.Element) -> set[str]:
    return set(e.get("class", "").split())


def _all(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(SVG + tag) if cls in _classes(e)]


def _panels(root: ET.Element) -> list[ET.Element]:
    return _all(root, "g", "panel")


def test_one_panel_per_region_with_the_pooled_one_last_and_highlighted() -> None:
    svg = federated({"leeds": [100, 40], "york": [60, 30], "hull": [20, 50]}).chart_svg()
    root = _parse(svg)
    assert root.get("class") == "chc-chart"
    assert root.get("role") == "img"
    labelled = (root.get("aria-labelledby") or "").split()
    ids = {e.get("id") for e in root.iter() if e.get("id")}
    assert labelled
    assert set(labelled) <= ids
    assert root.find(SVG + "title") is not None
    assert root.find(SVG + "desc") is not None
    panels = _panels(root)
    assert [p.get("data-region") for p in panels] == ["leeds", "york", "hull", POOLED]
    assert _classes(panels[-1]) == {"panel", "pooled"}
    assert all(_classes(p) == {"panel"} for p in panels[:-1])
    for p in panels:
        bars = _all(p, "rect", "bar")
        assert [b.get("data-group") for b in bars] == ["female", "male"]
        pooled = p.get("data-region") == POOLED
        assert all(("pooled" in _classes(b)) is pooled for b in bars)
        assert len(_all(p, "line", "whisker")) == 2


def test_bar_and_whisker_counts_follow_published_estimates_and_intervals() -> None:
    result = federated({"leeds": [100, 3], "york": [60, 30], "hull": [20, 50]})
    root = _parse(result.chart_svg())
    rows = result.table.to_pylist()
    published = [r for r in rows if r["estimate"] is not None]
    with_ci = [r for r in published if r["ci_low"] is not None and r["ci_high"] is not None]
    hidden = [r for r in rows if r["estimate"] is None]
    assert hidden, "the rules suppress the count of 3"
    assert len(_all(root, "rect", "bar")) == len(published)
    assert len(_all(root, "line", "whisker")) == len(with_ci)
    marks = _all(root, "text", "suppressed")
    assert len(marks) == len(hidden)
    assert all("suppressed" in "".join(m.itertext()) for m in marks)
    for p in _panels(root):
        region = p.get("data-region")
        expected = {r["sex"] for r in hidden if r["region"] == region}
        assert {m.get("data-group") for m in _all(p, "text", "suppressed")} == expected
        assert expected.isdisjoint(b.get("data-group") for b in _all(p, "rect", "bar"))


def test_each_bar_has_a_title_with_its_estimate_and_interval() -> None:
    root = _parse(federated({"leeds": [100, 40]}, rules=NO_RULES).chart_svg())
    first = _all(root, "rect", "bar")[0]
    assert first.get("data-estimate") == "100.0"
    title = first.find(SVG + "title")
    assert title is not None
    assert title.text is not None
    assert title.text.startswith("leeds, female: 100 (95% CI ")
    assert " to " in title.text


def test_a_partial_result_marks_the_pooled_panel_and_still_counts_right() -> None:
    result = federated({"leeds": [100, 40], "york": [60, None]}, missing={"hull": "down"})
    root = _parse(result.chart_svg())
    pooled = _panels(root)[-1]
    heading = _all(pooled, "text", "panel-title")[0]
    assert "partial" in "".join(heading.itertext())
    desc = root.find(SVG + "desc")
    assert desc is not None
    assert "partial" in (desc.text or "")
    rows = result.table.to_pylist()
    assert len(_all(root, "rect", "bar")) == sum(r["estimate"] is not None for r in rows)
    assert len(_all(root, "text", "suppressed")) == sum(r["estimate"] is None for r in rows)


def _x(e: ET.Element, name: str) -> float:
    return float(e.get(name, "nan"))


def test_negative_estimates_are_drawn_left_of_zero_on_an_axis_covering_every_interval() -> None:
    result = federated({"a": [50, -30], "b": [-80, 20]}, statistic=Statistic.SUM, rules=NO_RULES)
    root = _parse(result.chart_svg())
    for p in _panels(root):
        (zero,) = _all(p, "line", "zero")
        z = _x(zero, "x1")
        ticks = [_x(t, "x1") for t in _all(p, "line", "tick")] + [z]
        left, right = min(ticks), max(ticks)
        for bar in _all(p, "rect", "bar"):
            estimate = float(bar.get("data-estimate", "nan"))
            x, w = _x(bar, "x"), _x(bar, "width")
            if estimate < 0:
                assert x + w == pytest.approx(z, abs=0.11)
            else:
                assert x == pytest.approx(z, abs=0.11)
        for whisker in _all(p, "line", "whisker"):
            assert left - 0.11 <= _x(whisker, "x1") <= _x(whisker, "x2") <= right + 0.11


def test_region_and_group_names_are_escaped() -> None:
    evil = '<script>alert("x")</script>'
    result = federated({evil: [100, 40]}, groups=(evil, "b&b"), rules=NO_RULES)
    svg = result.chart_svg()
    assert "<script" not in svg
    root = _parse(svg)
    assert _panels(root)[0].get("data-region") == evil
    assert [b.get("data-group") for b in _all(root, "rect", "bar")][:2] == [evil, "b&b"]
    assert not list(root.iter(SVG + "script"))
    assert not list(root.iter("script"))


def test_an_unknown_measure_is_refused_naming_the_ones_there_are() -> None:
    with pytest.raises(QueryError, match="give one of 'count'"):
        federated({"leeds": [100, 40]}).chart_svg("persons")


def test_a_result_without_rows_gives_an_empty_chart() -> None:
    result = federated({})
    root = _parse(result.chart_svg())
    assert _panels(root) == []
    desc = root.find(SVG + "desc")
    assert desc is not None
    assert "no rows" in (desc.text or "")
