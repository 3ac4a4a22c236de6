"""Who may ask this node what: the custodian's access policy from node.toml's [access].

    [access]
    analysts = ["*"]                  # analyst names allowed to query ("*": any analyst)
    organisations = ["*"]             # certificate organisations allowed ("*": any)
    views = ["*"]                     # views and pathways any allowed analyst may query
    [access.analyst_views]            # optional narrower lists for named analysts
    alice = ["copd", "persons"]

An analyst must be allowed by name and by organisation, and the view must be allowed for
them. Auditors only read the ledger and the hub only relays: neither can query.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from queries.errors import ConfigError, PermissionDeniedError

ANY = "*"
# The keys of [access] (documented in docs/configuration.md).
ACCESS_KEYS = frozenset({"analysts", "organisations", "views", "analyst_views"})


@dataclass(frozen=True)
class AccessPolicy:
    """The node's allow-lists."""

    analysts: tuple[str, ...] = (ANY,)
    organisations: tuple[str, ...] = (ANY,)
    views: tuple[str, ...] = (ANY,)
    analyst_views: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def check(self, *, analyst: str, organisation: str, view: str) -> None:
        """Raise PermissionDeniedError unless this analyst may query this view."""
        if ANY not in self.analysts and analyst not in self.analysts:
            raise PermissionDeniedError(
                f"analyst {analyst!r} is not on this node's access list; ask the custodian"
            )
        if ANY not in self.organisations and organisation not in self.organisations:
            shown = organisation or "(no organisation in the certificate)"
            raise PermissionDeniedError(
                f"organisation {shown!r} may not query this node; ask the custodian"
            )
        allowed = dict(self.analyst_views).get(analyst, self.views)
        if ANY not in allowed and view not in allowed:
            raise PermissionDeniedError(
                f"analyst {analyst!r} may not query view {view!r} at this node; "
                f"allowed: {sorted(allowed)}"
            )


def _names(raw: object, field: str, source: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ConfigError(f'{source}: access.{field} must be a list of names, e.g. ["*"]')
    return tuple(raw)


def parse_access(raw: object, source: str) -> AccessPolicy:
    """Build the policy from node.toml's [access] table (absent: everyone in the federation)."""
    if raw is None:
        return AccessPolicy()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [access] must be a table")
    known = ACCESS_KEYS
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown [access] key(s) {unknown}; known: {sorted(known)}")
    per_analyst = raw.get("analyst_views", {})
    if not isinstance(per_analyst, Mapping):
        raise ConfigError(f"{source}: [access.analyst_views] must map analyst names to lists")
    return AccessPolicy(
        analysts=_names(raw.get("analysts", [ANY]), "analysts", source),
        organisations=_names(raw.get("organisations", [ANY]), "organisations", source),
        views=_names(raw.get("views", [ANY]), "views", source),
        analyst_views=tuple(
            (str(k), _names(v, f"analyst_views.{k}", source)) for k, v in per_analyst.items()
        ),
    )
