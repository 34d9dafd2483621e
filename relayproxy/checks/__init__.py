"""Checks that return verdicts at each stage; build_pipeline assembles them from the config.

The built-in limits come first (cheapest, and decisive), then the checks the configuration
loads by name (`plugins.checks`, "package.module:Class"), in the order given.
"""

from __future__ import annotations

import importlib

from ..config import Config, ConfigError
from .base import BodyObserver, Check, Envelope, MessageInfo, Need, Pipeline, SessionInfo
from .limits import MessageFormat, MessageSize, RecipientLimit
from .recipient_domain import AcceptDomains

__all__ = [
    "BodyObserver",
    "Check",
    "Envelope",
    "MessageInfo",
    "Need",
    "Pipeline",
    "SessionInfo",
    "build_pipeline",
]


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


def build_pipeline(config: Config) -> Pipeline:
    server = config.server
    return Pipeline(
        [
            AcceptDomains(server.accept_domains),
            RecipientLimit(server.max_recipients),
            MessageSize(server.max_message_size),
            MessageFormat(),
            *(load_check(spec) for spec in config.plugins.checks),
        ]
    )
