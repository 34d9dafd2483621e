"""End of data: the message-level limits, decided before the final dot is sent downstream."""

from __future__ import annotations

from .. import replies
from ..policy.verdict import Verdict
from .base import Check, Envelope, MessageInfo, SessionInfo


def _verdict(reply: replies.Reply, check: str) -> Verdict:
    return Verdict.reject(reply.text, reply.code, reply.enhanced, check=check)


class MessageFormat(Check):
    """Bare CR/LF (when not normalised) and overlong lines, as found by the DotReader."""

    name = "message_format"

    async def on_data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        if message.bare_newline and not message.normalized:
            return _verdict(replies.BARE_NEWLINE, self.name)
        if message.line_too_long:
            return _verdict(replies.DATA_LINE_TOO_LONG, self.name)
        return None


class MessageSize(Check):
    name = "message_size"

    def __init__(self, max_size: int):
        self.max_size = max_size

    async def on_data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        if message.size > self.max_size:
            return _verdict(replies.SIZE_EXCEEDED, self.name)
        return None
