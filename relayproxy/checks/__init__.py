"""Checks that return verdicts at each stage; build_pipeline assembles them from the config."""

from __future__ import annotations

from ..config import Config
from .base import Check, Envelope, MessageInfo, Pipeline, SessionInfo
from .message import MessageFormat, MessageSize
from .recipient_domain import AcceptDomains

__all__ = ["Check", "Envelope", "MessageInfo", "Pipeline", "SessionInfo", "build_pipeline"]


def build_pipeline(config: Config) -> Pipeline:
    return Pipeline(
        [
            AcceptDomains(config.server.accept_domains),
            MessageFormat(),
            MessageSize(config.server.max_message_size),
        ]
    )
