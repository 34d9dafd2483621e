"""Checks that return verdicts at each stage (base.py: the hooks), and the built-in ones.

relayproxy.pipeline assembles them with the rules engine and plugins from the configuration.
"""

from __future__ import annotations

from .base import BodyObserver, Check, Envelope, MessageInfo, Need, Pipeline, SessionInfo
from .limits import MessageFormat, MessageSize, RecipientLimit
from .recipient_domain import AcceptDomains

__all__ = [
    "AcceptDomains",
    "BodyObserver",
    "Check",
    "Envelope",
    "MessageFormat",
    "MessageInfo",
    "MessageSize",
    "Need",
    "Pipeline",
    "RecipientLimit",
    "SessionInfo",
]
