"""What the notebook views cost: a real federated result as frames, an SVG chart and HTML.

A four-region federation on loopback answers one grouped query (counts by age band and sex
over `persons`: 7 x 3 groups, five panels with the pooled one); the result is then turned
into each presentation, timed interleaved against the baseline of the same table straight
from pyarrow (`result.table.to_pandas()`), which is what a notebook would do without chc's
views. Prints JSON with the ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.query_engine import interleaved
from bench.timing import summary
from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from queries.sql import parse_sql

SQL = "SELECT age_band, sex, COUNT(*) AS persons FROM persons GROUP BY age_band, sex"


def main() -> None:
    """Run one query and time its presentations."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--persons", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = synth.generate_federation(args.persons, root / "data", seed=7)
        setups = tuple(
            NodeSetup(name=r.slug, omop=folders[r.slug], title=r.name) for r in synth.REGIONS
        )
        with (
            LocalFederation(workdir=root, nodes=setups) as fed,
            Federation(fed.hub_address, fed.analyst_identity) as client,
        ):
            result = client.query(parse_sql(SQL, rho=0.05))
    runs = {
        "pyarrow_to_pandas": lambda: result.table.to_pandas(),
        "to_arrow": result.to_arrow,
        "to_pandas": result.to_pandas,
        "to_polars": result.to_polars,
        "chart_svg": result.chart_svg,
        "repr_html": result._repr_html_,
    }
    times = interleaved(runs, args.repeats)
    base = summary(times["pyarrow_to_pandas"])["p50_ms"]
    out = {
        "benchmark": "present",
        "rows": result.table.num_rows,
        **{name: summary(xs) for name, xs in times.items()},
        "ratio_p50_vs_pyarrow_to_pandas": {
            name: round(summary(xs)["p50_ms"] / base, 2)
            for name, xs in times.items()
            if name != "pyarrow_to_pandas"
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
