"""Node configuration (node.toml) and the node's privacy budget."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from node.access import AccessPolicy, parse_access
from node.data.care_sites import check_codes
from node.data.cohorts import parse_cohorts
from node.data.consent import ConsentPolicy, parse_consent
from protocols.budget.policy import PERIODS, BudgetPolicy
from protocols.observability.listeners import SERVING_KEYS, ServingSettings, parse_serving
from protocols.security.pki import Identity, Role
from queries.cohort import CohortPolicy
from queries.errors import ConfigError
from queries.results import ReleaseRules

BUDGET_KEYS = frozenset(
    {"total_rho", "max_rho_per_query", "delta", "period", "analyst_rho", "analysts"}
    | {"lifetime_rho", "analyst_lifetime_rho", "analysts_lifetime"}
)
# The keys load_config accepts at the top level of node.toml, and in [release]; every one is
# documented in docs/configuration.md (tests/unit/test_configuration_doc.py checks).
NODE_KEYS = frozenset(
    {"name", "omop", "identity", "listen", "reference_date", "pathways", "budget"}
    | {"release", "access", "crl"}
    | {"ledger", "ledger_key"}
    | {"omop_schema", "imd_lookup", "pathways_dir", "consent"}
    | {"cohorts", "models", "care_sites", "learning", "hub"}
    # Health and metrics listeners, log format and drain (docs/observability.md).
    | SERVING_KEYS
)
RELEASE_KEYS = frozenset({"suppress_below", "round_to"})
# [models]: the node's refusal rules for model fits (node/fitting.py, docs/configuration.md).
MODEL_KEYS = frozenset({"min_level_persons", "max_parameter_ratio"})
# [care_sites]: the care sites the node publishes (node/data/care_sites.py).
CARE_SITE_KEYS = frozenset({"publish"})
# [learning]: the node's SuperNode for Flower runs (node/flower/supernode.py).
LEARNING_KEYS = frozenset(
    {"superlink", "root_certificate", "allowed_fabs", "hub_fleet", "hub_name"}
)
# [hub]: outbound-only mode, the node dialling the hub (node/dial.py, docs/outbound.md).
HUB_LINK_KEYS = frozenset({"dial", "hub_name", "inbound"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ADDRESS = re.compile(r"[A-Za-z0-9.\-]+:[0-9]{1,5}|\[[0-9A-Fa-f:]+\]:[0-9]{1,5}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?")


# Refusals from one peer that reach the ledger per window (node.guards.RefusalLimiter,
# docs/threat-model.md "Bounded work"): 30 a minute is far more than an analyst fixing a
# query or a hub relaying a busy federation's mistakes produce, and caps what an authenticated
# peer can make the node write by being refused at 31 entries (about 100 KB) a minute.
REFUSALS_PER_WINDOW = 30
REFUSAL_WINDOW_SECONDS = 60.0

# A node's name is a DNS label (RFC 1123) in lower case, with '_' allowed as `chc-node init`
# always has: it names the node's certificate, its default ledger file beside node.toml and
# every entry, so it can never be a path.
NODE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def check_node_name(name: object, source: str = "node.toml") -> str:
    """Return name if it is a valid node name, else raise a ConfigError saying the rule."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ConfigError(
            f"{source}: name {shown} is not a valid node name: use 1-63 lower-case letters, "
            "digits, '-' or '_', starting with a letter (the name of the node's certificate)"
        )
    return name


@dataclass(frozen=True)
class ModelPolicy:
    """When a node refuses a model fit, decided on the design check's noisy counts.

    DataSHIELD's nfilter rules are the anchor: nfilter.tab (a level with too few persons;
    DataSHIELD's default is 3, ours 10 as for our disclosure rules) and nfilter.glm (at most
    0.33 parameters per person).
    """

    min_level_persons: int = 10
    max_parameter_ratio: float = 0.33

    def __post_init__(self) -> None:
        m, r = self.min_level_persons, self.max_parameter_ratio
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError("models.min_level_persons must be a whole number >= 0")
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
            raise ConfigError("models.max_parameter_ratio must be a number in (0, 1]")
        object.__setattr__(self, "max_parameter_ratio", float(r))


@dataclass(frozen=True)
class LearningConfig:
    """[learning]: where the node's SuperNode dials, the CA it trusts, and reviewed FABs."""

    # host:port of the hub's Flower SuperLink; None: no SuperNode unless `serve --learning`.
    superlink: str | None = None
    # host:port of the hub's Fleet proxy (mutual TLS): the SuperNode then dials a local
    # forwarder that presents the node's certificate (protocols/nginx_proxy.py).
    hub_fleet: str | None = None
    # The name the hub proxy's certificate must carry (default: hub_fleet's host).
    hub_name: str | None = None
    # The CA the SuperLink's certificate must chain to (default: ca.pem in the identity folder).
    root_certificate: Path | None = None
    # sha256 (hex) of FABs the custodian reviewed and allows although they carry more than
    # pyproject.toml (node/flower/fab_policy.py).
    allowed_fabs: tuple[str, ...] = ()


@dataclass(frozen=True)
class HubLinkConfig:
    """[hub]: the hub this node dials (outbound-only mode), and whether it listens too."""

    # host:port of the hub; None: the node only listens, and the hub dials it.
    dial: str | None = None
    # The name the hub's certificate must carry (TLS, and the hub's signed welcome).
    hub_name: str = "hub"
    # With dial: also serve inbound calls on `listen` (default: no listening port at all).
    inbound: bool = False


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start, from node.toml."""

    name: str
    omop: Path
    identity: Path
    listen: str = "127.0.0.1:50051"
    # None: the end of the data, rounded up to a month end (node/data/reference.py).
    reference_date: date | None = None
    pathways: tuple[str, ...] | None = None
    budget: BudgetPolicy = field(default_factory=BudgetPolicy)
    release: ReleaseRules = field(default_factory=ReleaseRules)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    # The federation's certificate revocation list (default: crl.pem in the identity folder).
    crl: Path | None = None
    # The privacy ledger (default: <name>.ledger.sqlite beside node.toml, see
    # node.budget.accounting.open_accountant) and its Ed25519 signing key (default: beside it).
    ledger: Path | None = None
    ledger_key: Path | None = None
    # Data layer (docs/data.md): the schema of a DuckDB source, the LSOA -> IMD lookup, a
    # folder of custodian pathway files, and opt-outs / children's consent ([consent]).
    omop_schema: str | None = None
    imd_lookup: Path | None = None
    pathways_dir: Path | None = None
    consent: ConsentPolicy = field(default_factory=ConsentPolicy)
    # Analysts' ad hoc cohorts ([cohorts], node/data/cohorts.py): none unless allowed.
    cohorts: CohortPolicy = field(default_factory=CohortPolicy)
    # When model fits are refused on their design check ([models]).
    models: ModelPolicy = field(default_factory=ModelPolicy)
    # The ODS codes of the care sites published as `care_site` ([care_sites] publish).
    care_sites: tuple[str, ...] = ()
    # The node's Flower SuperNode ([learning]).
    learning: LearningConfig = field(default_factory=LearningConfig)
    # The hub this node dials instead of (or as well as) listening ([hub]).
    hub: HubLinkConfig = field(default_factory=HubLinkConfig)
    # metrics_listen, health_listen, log_format, drain_grace_s (docs/observability.md).
    serving: ServingSettings = field(default_factory=ServingSettings)

    def __post_init__(self) -> None:
        check_node_name(self.name)


def check_node_certificate(config: NodeConfig, identity: Identity, source: str) -> None:
    """Refuse to run a node whose certificate is not a node's or names another node.

    Clients check a node's certificate name (its TLS server name), and auditors the name in
    its ledger, so a node answering under another name would be refused or misattributed.
    """
    if identity.role is not Role.NODE:
        raise ConfigError(
            f"{source}: {config.identity} holds a {identity.role.value} certificate, not a node "
            "one; issue one with `chc pki issue --role node`"
        )
    if identity.name != config.name:
        raise ConfigError(
            f"{source}: name {config.name!r} does not match the node's certificate, which is "
            f"issued to {identity.name!r} ({config.identity}); set name = {identity.name!r} or "
            f"issue a certificate for {config.name!r} (chc pki issue --role node --name "
            f"{config.name})"
        )


def _path(base: Path, raw: object, field: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{field} must be a path string")
    path = Path(raw)
    return path if path.is_absolute() else (base / path)


def load_config(path: Path) -> NodeConfig:
    """Read node.toml; relative paths are taken from the file's folder."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"node config {path} does not exist; create it with `chc-node init`"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"node config {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read node config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    base = path.parent
    known = NODE_KEYS
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "omop", "identity"):
        if key not in data:
            raise ConfigError(f"{path}: missing required key {key!r}")
    budget_raw = data.get("budget", {})
    if not isinstance(budget_raw, dict):
        raise ConfigError(f"{path}: [budget] must be a table")
    unknown_budget = sorted(set(budget_raw) - BUDGET_KEYS)
    if unknown_budget:
        raise ConfigError(f"{path}: unknown [budget] key(s) {unknown_budget}")
    ref = data.get("reference_date")
    if ref is not None and (isinstance(ref, datetime) or not isinstance(ref, date)):
        raise ConfigError(f"{path}: reference_date must be a TOML date such as 2025-12-31")
    pathways = data.get("pathways")
    if pathways is not None and not (
        isinstance(pathways, list) and all(isinstance(p, str) for p in pathways)
    ):
        raise ConfigError(f"{path}: pathways must be a list of pathway names")
    return NodeConfig(
        name=check_node_name(data["name"], str(path)),
        omop=_path(base, data["omop"], "omop"),
        identity=_path(base, data["identity"], "identity"),
        listen=str(data.get("listen", "127.0.0.1:50051")),
        reference_date=ref,
        pathways=tuple(pathways) if pathways is not None else None,
        budget=_budget_policy(budget_raw, path),
        release=_release_rules(data.get("release", {}), str(path)),
        access=parse_access(data.get("access"), str(path)),
        crl=_path(base, data["crl"], "crl") if "crl" in data else None,
        ledger=_path(base, data["ledger"], "ledger") if "ledger" in data else None,
        ledger_key=_path(base, data["ledger_key"], "ledger_key") if "ledger_key" in data else None,
        omop_schema=str(data["omop_schema"]) if "omop_schema" in data else None,
        imd_lookup=_path(base, data["imd_lookup"], "imd_lookup") if "imd_lookup" in data else None,
        pathways_dir=(
            _path(base, data["pathways_dir"], "pathways_dir") if "pathways_dir" in data else None
        ),
        consent=parse_consent(data.get("consent", {}), base, str(path)),
        cohorts=parse_cohorts(data.get("cohorts"), str(path)),
        models=_model_policy(data.get("models", {}), str(path)),
        care_sites=_care_sites(data.get("care_sites", {}), str(path)),
        learning=_learning(data.get("learning", {}), base, str(path)),
        hub=_hub_link(data.get("hub", {}), str(path)),
        serving=parse_serving(data, str(path)),
    )


def check_superlink_address(address: object, source: str, key: str = "learning.superlink") -> str:
    """Return address if it is host:port (IPv6 in brackets), else raise a ConfigError."""
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise ConfigError(
            f'{source}: {key} must be host:port (e.g. "hub.example.org:9092"), '
            f"not {str(address)[:80]!r}"
        )
    port = int(address.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise ConfigError(f"{source}: {key} port {port} is out of range")
    return address


def _learning(raw: object, base: Path, source: str) -> LearningConfig:
    """[learning] superlink or hub_fleet (+ hub_name) / root_certificate / allowed_fabs."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [learning] must be a table")
    unknown = sorted(set(raw) - LEARNING_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown [learning] key(s) {unknown}; known: {sorted(LEARNING_KEYS)}"
        )
    allowed = raw.get("allowed_fabs", [])
    if not isinstance(allowed, list) or not all(
        isinstance(a, str) and _SHA256.fullmatch(a.lower()) for a in allowed
    ):
        raise ConfigError(
            f"{source}: learning.allowed_fabs must be a list of sha256 hashes (64 hex digits "
            "each), as the node's log names a refused FAB"
        )
    superlink, hub_fleet, hub_name = raw.get("superlink"), raw.get("hub_fleet"), raw.get("hub_name")
    if superlink is not None and hub_fleet is not None:
        raise ConfigError(
            f"{source}: [learning] sets both superlink and hub_fleet; keep hub_fleet (the hub's "
            "Fleet proxy) unless the SuperLink is on this machine"
        )
    if hub_name is not None and (not isinstance(hub_name, str) or not _HOST.fullmatch(hub_name)):
        raise ConfigError(
            f"{source}: learning.hub_name must be the host name in the hub's certificate "
            f'(e.g. "hub"), not {str(hub_name)[:80]!r}'
        )
    return LearningConfig(
        superlink=check_superlink_address(superlink, source) if superlink is not None else None,
        hub_fleet=(
            check_superlink_address(hub_fleet, source, key="learning.hub_fleet")
            if hub_fleet is not None
            else None
        ),
        hub_name=hub_name,
        root_certificate=(
            _path(base, raw["root_certificate"], "learning.root_certificate")
            if "root_certificate" in raw
            else None
        ),
        allowed_fabs=tuple(a.lower() for a in allowed),
    )


def _hub_link(raw: object, source: str) -> HubLinkConfig:
    """[hub] dial / hub_name / inbound (outbound-only mode)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [hub] must be a table")
    unknown = sorted(set(raw) - HUB_LINK_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown [hub] key(s) {unknown}; known: {sorted(HUB_LINK_KEYS)}"
        )
    hub_name = raw.get("hub_name", "hub")
    if not isinstance(hub_name, str) or not _HOST.fullmatch(hub_name):
        raise ConfigError(
            f'{source}: hub.hub_name must be the name in the hub\'s certificate (e.g. "hub"), '
            f"not {str(hub_name)[:80]!r}"
        )
    inbound = raw.get("inbound", False)
    if not isinstance(inbound, bool):
        raise ConfigError(f"{source}: hub.inbound must be true or false")
    dial = raw.get("dial")
    if dial is None and (inbound or "hub_name" in raw):
        raise ConfigError(
            f"{source}: [hub] sets hub_name or inbound but not dial, the hub's host:port; "
            "set dial to run the node outbound-only, or remove [hub]"
        )
    return HubLinkConfig(
        dial=check_superlink_address(dial, source, key="hub.dial") if dial is not None else None,
        hub_name=hub_name,
        inbound=inbound,
    )


def _care_sites(raw: object, source: str) -> tuple[str, ...]:
    """[care_sites] publish: the declared ODS codes."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [care_sites] must be a table")
    unknown = sorted(set(raw) - CARE_SITE_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown [care_sites] key(s) {unknown}; known: {sorted(CARE_SITE_KEYS)}"
        )
    return check_codes(raw.get("publish", []), source)


def _model_policy(raw: object, source: str) -> ModelPolicy:
    """[models] min_level_persons / max_parameter_ratio."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [models] must be a table")
    unknown = sorted(set(raw) - MODEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown [models] key(s) {unknown}; known: {sorted(MODEL_KEYS)}"
        )
    try:
        return ModelPolicy(**raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _budget_policy(raw: dict[str, Any], path: Path) -> BudgetPolicy:
    """[budget], with [budget.analysts] and [budget.analysts_lifetime] (name = rho) overrides."""
    values = dict(raw)
    analysts, lifetime = (_caps_table(values.pop(t, {}), t, path) for t in _TABLES)
    if "period" in values and not isinstance(values["period"], str):
        raise ConfigError(f"{path}: budget.period must be one of {list(PERIODS)}")
    return BudgetPolicy(**values, analysts=analysts, analysts_lifetime=lifetime)


_TABLES = ("analysts", "analysts_lifetime")


def _caps_table(raw: object, table: str, path: Path) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [budget.{table}] must be a table of name = rho")
    return tuple(sorted(raw.items()))


def _release_rules(raw: object, source: str) -> ReleaseRules:
    """[release] suppress_below / round_to, the node's disclosure rules."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [release] must be a table")
    unknown = sorted(set(raw) - RELEASE_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown [release] key(s) {unknown}")
    values = {k: v for k, v in raw.items()}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{source}: release.{k} must be a whole number")
    return ReleaseRules(**values)
