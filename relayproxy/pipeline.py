"""The checks of one configuration, in order: built-in limits, rate limits and rules, plugins.

The built-in limits come first (cheapest, and decisive), then the rate limits and the rules
engine of the rule files (rules.files), the content scanners ([scanners.*]), then the checks
the configuration loads by name (`plugins.checks`, "package.module:Class"), in the order given.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver

from . import metrics
from .checks import AcceptDomains, Check, MessageFormat, MessageSize, Pipeline, RecipientLimit
from .config import Config, ConfigError
from .dns import ClientNames
from .policy.dnsbl import Dnsbl
from .policy.engine import RulesCheck, Settings
from .policy.geo import CountryDB
from .policy.limits import Limit, Limits
from .policy.recipients import Greylist, RecipientCache
from .policy.rules import RuleError, load_rules
from .policy.state import Store
from .scanners import scanner_checks


@dataclass(frozen=True, slots=True)
class Services:
    """What checks share across sessions and reloads: DNS and its caches, limit state."""

    resolver: dns.asyncresolver.Resolver
    names: ClientNames
    dnsbl: Dnsbl
    store: Store


def load_check(spec: str) -> Check:
    """Instantiate "package.module:Class" (a Check subclass taking no arguments)."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        check = factory()
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"plugins.checks: cannot load {spec!r}: {exc}") from None
    if not isinstance(check, Check):
        raise ConfigError(f"plugins.checks: {spec!r} is not a relayproxy Check")
    return check


def policy_checks(config: Config, services: Services, trace: bool = False) -> list[Check]:
    """The rules engine and the limits of the configured rule files ([] without any)."""
    rc = config.rules
    checks: list[Check] = []
    if rc.greylist_delay:
        # after the limits and the rules, so a refused client is not also greylisted
        try:
            checks.append(Greylist(services.store, delay=rc.greylist_delay))
        except ValueError as exc:
            raise ConfigError(f"rules.greylist_delay: {exc}") from None
    if not rc.files:
        return checks
    countries = None
    try:
        if rc.country_db:
            countries = CountryDB(str(Path(config.base_dir) / rc.country_db))
        ruleset = load_rules(rc.files, Path(config.base_dir), countries is not None)
        limits = [Limit.from_table(table) for table in ruleset.limits]
        if rc.mode == "monitor":  # the global monitor mode holds for limits too
            limits = [dataclasses.replace(limit, monitor=True) for limit in limits]
    except (RuleError, ValueError) as exc:
        raise ConfigError(f"rules: {exc}") from None
    settings = Settings(rc.mode, rc.reject_score, rc.tempfail_score, rc.exempt_recipients,
                        rc.body_scan_bytes, rc.check_timeout, config.server.hostname)
    # refusals only: nothing here reads positive entries
    cache = RecipientCache(services.store, positive_ttl=0)
    policy: list[Check] = []
    if limits:
        for limit in limits:
            metrics.RULE_HITS.labels(limit.name, limit.action)
            metrics.RULE_HITS.labels(limit.name, "monitor")
        # the limits consult the cache themselves: a cached refusal still counts as an
        # unknown recipient, or probing known-bad addresses would never be counted
        policy.append(Limits(limits, services.store, recipient_cache=cache, on_hit=_count_hit))
    else:
        policy.append(cache)
    policy.append(RulesCheck(ruleset, settings, services.dnsbl, countries, trace=trace))
    return policy + checks


def _count_hit(limit: Limit, enforced: bool) -> None:
    metrics.RULE_HITS.labels(limit.name, limit.action if enforced else "monitor").inc()


def auth_checks(config: Config, services: Services) -> list[Check]:
    """SPF, DKIM, DMARC and ARC ([auth]); before the rules, which read their results."""
    if not config.auth.enabled:
        return []
    # imported here: pyspf, dkimpy, the Public Suffix List and GMP cost ~10 MB per process
    from .auth.check import AuthCheck

    return [AuthCheck(config.auth, services.resolver, config.server.hostname)]


def build_pipeline(config: Config, services: Services, trace: bool = False) -> Pipeline:
    server = config.server
    return Pipeline(
        [
            AcceptDomains(server.accept_domains),
            RecipientLimit(server.max_recipients),
            MessageSize(server.max_message_size),
            MessageFormat(),
            *auth_checks(config, services),
            *policy_checks(config, services, trace),
            # after the rules: the rules' header edits are part of what they scan, and their
            # results are in Envelope.facts for the rules at the end of data (observers end
            # before the end-of-data checks)
            *scanner_checks(config.scanners),
            *(load_check(spec) for spec in config.plugins.checks),
        ],
        # past this a check's silence is its failure (451 4.3.0); the rules engine itself
        # gives up on slow DNS at rules.check_timeout, before this ever fires
        deadline=config.rules.check_timeout + 5,
    )
