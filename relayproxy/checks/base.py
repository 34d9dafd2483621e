"""Stage hooks: what a check sees at each stage of the conversation, and the pipeline.

A check is a small class overriding only the stages it cares about; each returns a Verdict to
refuse, or None to let the stage go on. The session calls the pipeline at connect, HELO, MAIL,
RCPT and end of data; relayproxy.replies.for_verdict turns the first refusing verdict into the
reply. End-of-data checks run while the downstream still waits for the final dot, so they can
refuse a message that was already streamed without it ever being delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policy.verdict import Verdict


@dataclass(slots=True)
class SessionInfo:
    session_id: str
    client_ip: str
    client_port: int
    helo: str = ""
    esmtp: bool = False
    tls: bool = False
    client_name: str = ""  # forward-confirmed reverse DNS name, "" if none


@dataclass(slots=True)
class Envelope:
    sender: str = ""
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)


@dataclass(slots=True)
class MessageInfo:
    size: int
    bare_newline: bool
    line_too_long: bool
    normalized: bool


class Check:
    """Base class: every stage lets the conversation go on."""

    name = "check"

    async def on_connect(self, session: SessionInfo) -> Verdict | None:
        return None

    async def on_helo(self, session: SessionInfo) -> Verdict | None:
        return None

    async def on_mail(self, session: SessionInfo, envelope: Envelope) -> Verdict | None:
        return None

    async def on_rcpt(
        self, session: SessionInfo, envelope: Envelope, recipient: str
    ) -> Verdict | None:
        return None

    async def on_data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        return None


_STAGES = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data_end")


class Pipeline:
    """Runs the checks of a stage in order; the first refusing verdict wins."""

    def __init__(self, checks: list[Check]):
        self.checks = tuple(checks)
        # Only checks that override a stage are called for it: most stages of most checks are
        # no-ops and the per-message path should not pay for them.
        self._by_stage = {
            stage: tuple(c for c in checks if getattr(type(c), stage) is not getattr(Check, stage))
            for stage in _STAGES
        }

    async def connect(self, session: SessionInfo) -> Verdict | None:
        for check in self._by_stage["on_connect"]:
            if verdict := await check.on_connect(session):
                return verdict
        return None

    async def helo(self, session: SessionInfo) -> Verdict | None:
        for check in self._by_stage["on_helo"]:
            if verdict := await check.on_helo(session):
                return verdict
        return None

    async def mail(self, session: SessionInfo, envelope: Envelope) -> Verdict | None:
        for check in self._by_stage["on_mail"]:
            if verdict := await check.on_mail(session, envelope):
                return verdict
        return None

    async def rcpt(
        self, session: SessionInfo, envelope: Envelope, recipient: str
    ) -> Verdict | None:
        for check in self._by_stage["on_rcpt"]:
            if verdict := await check.on_rcpt(session, envelope, recipient):
                return verdict
        return None

    async def data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        for check in self._by_stage["on_data_end"]:
            if verdict := await check.on_data_end(session, envelope, message):
                return verdict
        return None
