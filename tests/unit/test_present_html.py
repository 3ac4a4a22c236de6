"""Notebook HTML of results and explanations (queries/present/html.py): content and escaping."""

from __future__ import annotations

from html.parser import HTMLParser

from queries.combine import POOLED
from queries.results import Explanation, NodeExplain, NodeStatus, ReleaseRules
from tests.unit._present_helpers import federated

EVIL = '<script>alert("x")</script>'


class _Tags(HTMLParser):
    """The start tags of a document, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:  # noqa: ARG002
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _read(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return parser


def test_the_title_line_says_query_nodes_partial_and_spend() -> None:
    result = federated(
        {"leeds": [100, 40], "york": [60, 30]}, missing={"hull": "connection refused"}
    )
    html = result._repr_html_()
    title = html[html.index('<p class="chc-title">') :].split("</p>", 1)[0]
    assert "0123abcd" in title
    assert "2 / 3 nodes ok" in title
    assert "partial: hull unreachable" in title
    assert "rho spent 0.2" in title


def test_the_table_shows_estimates_intervals_and_flags_and_a_chart() -> None:
    result = federated({"leeds": [100, 3], "york": [60, 30]})
    html = result._repr_html_()
    page = _read(html)
    text = " ".join(page.text)
    assert "95% CI" in text
    pooled = next(r for r in result.table.to_pylist() if r["region"] == POOLED and r["estimate"])
    lo, hi = pooled["ci_low"], pooled["ci_high"]
    assert f"{lo:,.0f}\u2013{hi:,.0f}" in text
    assert "suppressed" in text
    assert page.tags.count("tr") == 1 + result.table.num_rows
    assert page.tags.count("svg") == 1
    assert html.count('<tr class="pooled"') == 2


def test_names_and_messages_from_the_federation_are_escaped() -> None:
    result = federated(
        {EVIL: [100, 40]},
        groups=(EVIL, "b"),
        missing={"hull": EVIL},
        rules=ReleaseRules(suppress_below=0, round_to=1),
    )
    html = result._repr_html_()
    page = _read(html)
    assert "script" not in page.tags
    assert "<script" not in html
    assert EVIL in "".join(page.text)  # shown, as text


def test_an_explanation_shows_each_node_and_escapes_its_message() -> None:
    explanation = Explanation(
        (
            NodeExplain(node="leeds", status=NodeStatus.OK, rho=0.1, epsilon=1.2, cells=3),
            NodeExplain(node="york", status=NodeStatus.REFUSED, message=EVIL),
        )
    )
    html = explanation._repr_html_()
    page = _read(html)
    assert "script" not in page.tags
    text = "".join(page.text)
    assert "1 / 2 nodes can run it" in text
    assert EVIL in text
    assert 'data-node="leeds"' in html
    assert 'data-node="york"' in html
