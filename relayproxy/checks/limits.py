"""The built-in limits, as checks like any other, so the rules engine sees them too.

SIZE at MAIL and the message size at end of data (server.max_message_size), the header section
(server.max_header_size), recipients per message (server.max_recipients), and the line format
(bare CR/LF, line length, 8-bit content for a 7-bit downstream) as the DATA phase found it.
"""

from __future__ import annotations

from .. import replies
from ..policy.verdict import Action, Verdict
from .base import Check, Envelope, MessageInfo, SessionInfo


def _verdict(reply: replies.Reply, check: str) -> Verdict:
    action = Action.REJECT if reply.code >= 500 else Action.TEMPFAIL
    return Verdict(action, reply.text, reply.code, reply.enhanced, check=check)


class MessageSize(Check):
    name = "message_size"
    instant = True

    def __init__(self, max_size: int):
        self.max_size = max_size

    async def on_mail(self, session: SessionInfo, envelope: Envelope) -> Verdict | None:
        # RFC 1870 6: refuse at MAIL when the declared size is already too large
        declared = envelope.mail_params.get("SIZE")
        if declared is not None and int(declared) > self.max_size:
            return _verdict(replies.SIZE_EXCEEDED, self.name)
        return None

    async def on_data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        if message.size > self.max_size:
            return _verdict(replies.SIZE_EXCEEDED, self.name)
        if message.header_too_big:
            return _verdict(replies.HEADER_TOO_BIG, self.name)
        return None


class RecipientLimit(Check):
    name = "max_recipients"
    instant = True

    def __init__(self, max_recipients: int):
        self.max_recipients = max_recipients

    async def on_rcpt(
        self, session: SessionInfo, envelope: Envelope, recipient: str
    ) -> Verdict | None:
        # 452: the client sends the rest in another transaction (RFC 5321 4.5.3.1.10)
        if len(envelope.recipients) >= self.max_recipients:
            return _verdict(replies.TOO_MANY_RCPTS, self.name)
        return None


class MessageFormat(Check):
    """Bare CR/LF (when not normalised), overlong lines, and 8-bit content the downstream
    cannot take (RFC 6152 3: a relay must not pass 8-bit data to a 7-bit server)."""

    name = "message_format"
    instant = True

    async def on_data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        if message.bare_newline and not message.normalized:
            return _verdict(replies.BARE_NEWLINE, self.name)
        if message.line_too_long:
            return _verdict(replies.DATA_LINE_TOO_LONG, self.name)
        if message.eight_bit:
            return _verdict(replies.EIGHT_BIT_REFUSED, self.name)
        return None
