"""`chc`: the command line for analysts, auditors and hub operators.

The top-level app only: it assembles every role's commands, each defined beside its role
(coordinator/analyst/cli.py, coordinator/hub/cli.py, coordinator/local/cli.py and
coordinator/audit/cli.py), and is the console script's entry point.
"""

from __future__ import annotations

import typer

from coordinator.analyst.cli import nodes, query
from coordinator.audit.cli import audit_app, budget
from coordinator.hub.cli import federation_app, hub_app, pki_app
from coordinator.learning.cli import learn_app
from coordinator.local.cli import demo, synth_cmd
from coordinator.ui.cli import ui
from protocols.cli import ChcGroup, DebugOpt

app = typer.Typer(
    help="chc: federated, differentially private analytics for regional health data.",
    no_args_is_help=True,
    cls=ChcGroup,
    pretty_exceptions_show_locals=False,
)
app.add_typer(hub_app, name="hub")
app.add_typer(pki_app, name="pki")
app.add_typer(federation_app, name="federation")
app.add_typer(audit_app, name="audit")
app.command("budget")(budget)
# The order of registration is the order of `chc --help`.
app.command()(demo)
app.command("synth")(synth_cmd)
app.command()(query)
app.command()(nodes)
app.add_typer(learn_app, name="learn")
app.command()(ui)


@app.callback()
def _root(debug: DebugOpt = False) -> None:
    """chc: federated, differentially private analytics for regional health data."""
    del debug  # read by ChcGroup when a command fails


def main() -> None:
    """Entry point: every error ends in one line on stderr and an ExitCode (see ChcGroup)."""
    app()
