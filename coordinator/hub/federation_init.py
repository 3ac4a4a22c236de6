"""`chc federation init`: a whole federation's CA, identities and configurations in one folder.

The folder is the federation's CA folder (what `chc pki issue` and `chc pki revoke` take), and
every party's files sit in `<role>/<name>/`, the folder `chc pki issue` writes by default:

    FOLDER/ca.pem, ca.key, issued.json     the CA: stays with the operator (ca.key offline)
    FOLDER/hub/hub/hub.toml, identity/     copy to the hub's machine
    FOLDER/node/<name>/node.toml, identity/  copy to that node's machine
    FOLDER/analyst/<name>/                 the analyst's identity (chc --identity)
    FOLDER/auditor/<name>/                 the auditor's identity

node.toml and hub.toml name `identity = "identity"` (relative to their own folder), as
`chc-node init` does, so a machine's sub-folder works wherever it is copied.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.local.synth.areas import LOOKUP_FILE
from protocols.security.pki import CA_FILE, ISSUED_FILE, Role, create_ca, issue
from queries.errors import ConfigError

HUB_NAME = "hub"  # the analysts' client checks this name on the hub's certificate by default
IDENTITY_DIR = "identity"
NODE_PORT = 50051
HUB_ADDRESS = "127.0.0.1:50050"
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

# The node names node.toml accepts (node.config.NODE_NAME; coordinator cannot import node/).
_NODE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class NodeSpec:
    """One node of the federation to lay out, from `--node NAME[=OMOP][@HOST:PORT]`."""

    name: str
    omop: Path | None
    host: str
    port: int

    @property
    def address(self) -> str:
        """Where the hub reaches the node."""
        return f"{self.host}:{self.port}"

    @property
    def listen(self) -> str:
        """Where the node listens: loopback only for a loopback address, else every interface."""
        return f"127.0.0.1:{self.port}" if self.host in LOOPBACK else f"0.0.0.0:{self.port}"


def parse_node(text: str, index: int) -> NodeSpec:
    """Read `NAME[=OMOP_PATH][@HOST:PORT]`; without HOST:PORT the node is 127.0.0.1:50051+i."""
    rest, host, port = text, "127.0.0.1", NODE_PORT + index
    if "@" in text:
        head, _, tail = text.rpartition("@")
        if (m := _ADDRESS.fullmatch(tail)) is not None:
            rest, host, port = head, m["host"], int(m["port"])
            if not 0 < port < 65536:
                raise ConfigError(f"--node {text!r}: port {port} is not 1-65535")
    name, sep, omop = rest.partition("=")
    if not _NODE_NAME.fullmatch(name):
        raise ConfigError(
            f"--node {text!r}: {name!r} is not a valid node name: use 1-63 lower-case letters, "
            "digits, '-' or '_', starting with a letter (NAME[=OMOP_PATH][@HOST:PORT])"
        )
    if sep and not omop:
        raise ConfigError(f"--node {text!r}: give the OMOP path after '=', or leave out '='")
    # A relative path would be read from node.toml's folder: make it the one the operator meant.
    path = Path(omop).expanduser().absolute() if omop else None
    return NodeSpec(name=name, omop=path, host=host, port=port)


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT, checked."""
    m = _ADDRESS.fullmatch(text)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"{flag} {text!r} is not HOST:PORT (e.g. chc-hub.example.org:50050)")
    return m["host"], int(m["port"])


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hosts(*extra: str) -> tuple[str, ...]:
    """Certificate names: loopback (for trials on one machine) and the given host names."""
    hosts = ["localhost", "127.0.0.1"]
    hosts += [h.strip("[]") for h in extra if h.strip("[]") not in hosts]
    return tuple(dict.fromkeys(hosts))


def node_toml(node: NodeSpec) -> str:
    """A commented node.toml for one node (every key: docs/configuration.md)."""
    if node.omop is not None:
        omop = f"omop = {_toml_str(str(node.omop))}   # read in place, never written"
    else:
        omop = 'omop = "/path/to/omop"   # FILL IN: a folder of Parquet/CSV tables or a .duckdb'
    lookup = node.omop / LOOKUP_FILE if node.omop is not None else None
    imd = (
        f"imd_lookup = {_toml_str(str(lookup))}   # LSOA code -> IMD quintile"
        if lookup is not None and lookup.is_file()
        else '# imd_lookup = "/path/to/lsoa_imd.csv"   # LSOA code -> IMD quintile (docs/data.md)'
    )
    return "\n".join(
        [
            f"# node.toml for node {node.name}, written by `chc federation init`.",
            "# Every key: docs/configuration.md. Relative paths are taken from this folder.",
            "# Then: chc-node check --config node.toml; chc-node serve --config node.toml",
            f"name = {_toml_str(node.name)}   # the name on this node's certificate",
            omop,
            'identity = "identity"   # cert.pem, key.pem (0600), ca.pem; crl.pem once issued',
            f"listen = {_toml_str(node.listen)}   # the hub dials {node.address}",
            # Left to the node: the end of its data, rounded up to a month end (published).
            "# reference_date = 2025-12-31   # the day ages and windows end",
            imd,
            '# pathways = ["copd", "asthma_children"]   # default: every pathway',
            '# pathways_dir = "pathways"   # the custodian\'s own pathway files (*.yaml)',
            f'# ledger = "{node.name}.ledger.sqlite"   # the default: beside this file',
            "",
            "[budget]",
            "total_rho = 10.0   # the node's zCDP budget per period",
            "max_rho_per_query = 1.0",
            "# analyst_rho = 2.0   # each analyst's share per period",
            "# lifetime_rho = 50.0   # over the node's life (default 5 x total_rho)",
            "delta = 1e-6   # for reporting (epsilon, delta) equivalents",
            'period = "financial-year"',
            "",
            "[release]   # the node's disclosure rules (the hub may only make them stricter)",
            "suppress_below = 8",
            "round_to = 5",
            "",
            "[access]   # who may query this node",
            'analysts = ["*"]',
            'organisations = ["*"]',
            'views = ["*"]',
            "",
            "[consent]",
            "registers = []   # opt-out / dissent / consent registers (CSV or Parquet)",
            "national_opt_out = true",
            "",
        ]
    )


def hub_toml(nodes: Sequence[NodeSpec], listen: str) -> str:
    """A commented hub.toml listing the nodes."""
    lines = [
        "# hub.toml, written by `chc federation init`. Every key: docs/configuration.md.",
        "# Serve: chc hub serve --config hub.toml",
        'identity = "identity"   # cert.pem, key.pem (0600), ca.pem; crl.pem once issued',
        f"listen = {_toml_str(listen)}   # analysts connect here",
        "deadline_ms = 30000",
        "",
        "[release]   # the federation's disclosure rules; nodes may add to them",
        "suppress_below = 8",
        "round_to = 5",
    ]
    for node in nodes:
        lines += [
            "",
            "[[nodes]]",
            f"name = {_toml_str(node.name)}",
            f"title = {_toml_str(node.name)}   # the region's name in results",
            f"address = {_toml_str(node.address)}   # where the hub reaches the node",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Layout:
    """What `init_federation` wrote, for the next steps it prints."""

    folder: Path
    hub: Path
    hub_address: str
    nodes: tuple[tuple[NodeSpec, Path], ...]
    analyst: Path
    auditor: Path


def _check_target(folder: Path, force: bool) -> None:
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    if not force:
        raise ConfigError(f"{folder} exists and is not empty; give a new folder, or --force")
    if not (folder / CA_FILE).is_file():
        raise ConfigError(
            f"--force: {folder} is not a federation folder (no ca.pem); refusing to delete it"
        )
    ledgers = sorted(folder.rglob("*.ledger.sqlite"))
    if ledgers:
        raise ConfigError(
            f"--force: {ledgers[0]} is a node's privacy ledger; deleting it would reset that "
            "node's budget. Move the ledger away first, or give a new folder"
        )


def init_federation(
    folder: Path,
    nodes: Sequence[NodeSpec],
    *,
    hub_address: str = HUB_ADDRESS,
    hub_hosts: Sequence[str] = (),
    analyst: str = "analyst",
    analyst_org: str | None = None,
    auditor: str = "auditor",
    days: int = 365,
    force: bool = False,
) -> Layout:
    """Write the CA, every identity, hub.toml and a node.toml per node into folder."""
    if not nodes:
        raise ConfigError("give at least one --node NAME[=OMOP_PATH][@HOST:PORT]")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"--node names repeat: {names}")
    if len({n.address for n in nodes}) != len(nodes):
        raise ConfigError(f"two nodes share an address: {[n.address for n in nodes]}")
    if len({analyst, auditor}) != 2:
        raise ConfigError("--analyst and --auditor need different names")
    hub_host, hub_port = parse_address(hub_address, "--hub")
    _check_target(folder, force)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and moved into place, so a failure leaves no half federation.
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write(
            work,
            nodes,
            hub_host=hub_host,
            hub_port=hub_port,
            hub_hosts=hub_hosts,
            analyst=(analyst, analyst_org),
            auditor=auditor,
            days=days,
        )
        _retarget_index(work, folder)
        if folder.exists():
            shutil.rmtree(folder) if any(folder.iterdir()) else folder.rmdir()
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Layout(
        folder=folder,
        hub=folder / Role.HUB.value / HUB_NAME,
        hub_address=f"{hub_host}:{hub_port}",
        nodes=tuple((n, folder / Role.NODE.value / n.name) for n in nodes),
        analyst=folder / Role.ANALYST.value / analyst,
        auditor=folder / Role.AUDITOR.value / auditor,
    )


def _retarget_index(work: Path, folder: Path) -> None:
    """issued.json records where each identity was written: the target, not the work folder."""
    index = work / ISSUED_FILE
    entries = json.loads(index.read_text())
    for entry in entries:
        entry["folder"] = str(folder / Path(entry["folder"]).relative_to(work))
    index.write_text(json.dumps(entries, indent=2))


def _write(
    work: Path,
    nodes: Sequence[NodeSpec],
    *,
    hub_host: str,
    hub_port: int,
    hub_hosts: Sequence[str],
    analyst: tuple[str, str | None],
    auditor: str,
    days: int,
) -> None:
    create_ca(work)
    hub_dir = work / Role.HUB.value / HUB_NAME
    issue(
        work,
        role=Role.HUB,
        name=HUB_NAME,
        out_dir=hub_dir / IDENTITY_DIR,
        hosts=_hosts(hub_host, *hub_hosts),
        days=days,
    )
    listen = f"127.0.0.1:{hub_port}" if hub_host in LOOPBACK else f"0.0.0.0:{hub_port}"
    (hub_dir / "hub.toml").write_text(hub_toml(nodes, listen), encoding="utf-8")
    for node in nodes:
        node_dir = work / Role.NODE.value / node.name
        issue(
            work,
            role=Role.NODE,
            name=node.name,
            out_dir=node_dir / IDENTITY_DIR,
            hosts=_hosts(node.host),
            days=days,
        )
        (node_dir / "node.toml").write_text(node_toml(node), encoding="utf-8")
    # People's identity folders are what `chc --identity` takes: <role>/<name> itself.
    issue(work, role=Role.ANALYST, name=analyst[0], organisation=analyst[1], days=days)
    issue(work, role=Role.AUDITOR, name=auditor, days=days)


def next_steps(layout: Layout) -> str:
    """What the operator does next, printed by `chc federation init`."""
    root = layout.folder
    lines = [f"created a federation of {len(layout.nodes)} node(s) in {root}:"]
    lines.append(f"  {root}/ca.pem, ca.key   the CA: keep ca.key offline (chc pki issue/revoke)")
    lines.append(f"  {layout.hub}/   copy to the hub's machine")
    for node, path in layout.nodes:
        fill = "" if node.omop is not None else "; set `omop` in node.toml"
        lines.append(f"  {path}/   copy to node {node.name}'s machine{fill}")
    lines.append(f"  {layout.analyst}/   the analyst's identity (--identity)")
    lines.append(f"  {layout.auditor}/   the auditor's identity")
    first = layout.nodes[0][1]
    lines += [
        "next steps:",
        f"  1. on each node's machine: chc-node check --config {first}/node.toml",
        f"     then: chc-node serve --config {first}/node.toml",
        f"  2. on the hub's machine: chc hub serve --config {layout.hub}/hub.toml",
        f"  3. analysts: chc nodes --hub {layout.hub_address} --identity {layout.analyst}",
        f"     chc query --hub {layout.hub_address} --identity {layout.analyst} "
        "--view persons --group-by sex --rho 0.05",
        "  every key of node.toml and hub.toml: docs/configuration.md",
    ]
    return "\n".join(lines)
