"""The node.toml a local federation writes for each node, and the keys it owns.

A node of the demo either runs on generated settings (synthetic regions, tests) or on a
custodian's own node.toml (`chc demo --node NAME=node.toml`). In the second case the
custodian's file is used as it is: every key and table is copied unchanged, except the keys
the local federation must own to run the node at all and to keep the custodian's real state
out of reach (OWNED_KEYS). The node then checks the result with its own loader
(node/config.py), so a wrong or unknown key is refused with the node's own message; this side
never imports the node's code (docs/architecture.md).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Final

# tomli_w: the TOML writer of the tomli project (the reader became the standard library's
# tomllib), so what it writes reads back with tomllib exactly, dates and all.
import tomli_w

from queries.errors import ConfigError

# The keys the local federation sets, whatever the custodian's file says (README, "Bringing
# your own OMOP data"; docs/configuration.md):
# - name: the demo's certificate for the node is issued to the --node NAME;
# - identity, crl: the demo's own PKI (its CA signed the hub's and analyst's certificates);
# - listen: a free loopback port, which the demo's hub is configured with;
# - ledger, ledger_key: a fresh ledger (and its signing key) in the demo's workdir, so that
#   the demo's queries never spend from, or sign entries into, the custodian's real ledger.
OWNED_KEYS: Final = ("name", "identity", "crl", "listen", "ledger", "ledger_key")

# The custodian's keys that hold paths. The node takes a relative path from its node.toml's
# folder (node/config.py `_path`, node/data/consent.py `parse_consent`), and the demo's file
# lives elsewhere, so these are made absolute from the custodian's folder. Paths in owned keys
# are replaced, not moved. tests/unit/test_demo_node_toml.py checks this list against the
# node's loader, so a new path key cannot be missed.
PATH_KEYS: Final = ("omop", "imd_lookup", "pathways_dir")
TABLE_PATH_KEYS: Final = (("consent", "registers"),)


def read_node_toml(path: Path, *, source: str) -> dict[str, Any]:
    """A node.toml as a TOML table; source names where it was given, for the error."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read {path} as TOML: {exc}") from None


def _rebased(base: Path, raw: object) -> object:
    # Only path strings move; anything else is left for the node's loader to refuse.
    if isinstance(raw, str) and raw and not Path(raw).is_absolute():
        return str(base / raw)
    if isinstance(raw, list):
        return [_rebased(base, r) for r in raw]
    return raw


def custodian_table(path: Path, *, source: str) -> dict[str, Any]:
    """A custodian's node.toml, every relative path made absolute from the file's folder."""
    table = read_node_toml(path, source=source)
    # The node reads paths relative to Path(--config).parent without resolving symlinks, so
    # the same base is taken here (absolute, not resolved).
    base = path.absolute().parent
    for key in PATH_KEYS:
        if key in table:
            table[key] = _rebased(base, table[key])
    for name, key in TABLE_PATH_KEYS:
        sub = table.get(name)
        if isinstance(sub, dict) and key in sub:
            sub[key] = _rebased(base, sub[key])
    return table


def with_owned_keys(
    table: dict[str, Any], *, name: str, identity: Path, crl: Path, listen: str, ledger: Path
) -> dict[str, Any]:
    """table with the OWNED_KEYS set to the local federation's values (a new dict)."""
    out = dict(table)
    out.update(
        name=name,
        identity=str(identity.resolve()),
        crl=str(crl.resolve()),
        listen=listen,
        ledger=str(ledger.resolve()),
    )
    # The key is created beside the ledger (node.budget.keys.default_key_path).
    out.pop("ledger_key", None)
    return out


def dumps(table: dict[str, Any], *, comment: str) -> str:
    """The text of a TOML file (node.toml, hub.toml) for table, headed by comment lines."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + tomli_w.dumps(table)
