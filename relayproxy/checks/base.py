"""Stage hooks: what a check sees at each stage of the conversation, and the pipeline.

A check is a small class overriding only the stages it cares about; each returns a Verdict to
refuse, or None to let the stage go on. The session calls the pipeline at connect, HELO, MAIL,
RCPT and end of data; relayproxy.replies.for_verdict turns the first refusing verdict into the
reply.

In DATA a check can also watch the message (relayproxy.message runs this):
  - on_headers: the held header section, parsed once; the check may remove and prepend fields;
  - body_observer: a per-message object fed the body as message bytes (dot-stuffing removed),
    chunk by chunk, then asked for its verdict at the end of data; it may be async (a scanner
    connection), and while it awaits, the client is not read: backpressure, not buffering;
    when the header section leaves before the end of data (a message larger than the held
    window), it is told first (headers_leaving) and may still replace what it prepended;
  - on_data_end: the end-of-data verdict, while the downstream still waits for the final dot.
on_rcpt_reply sees the downstream's answer to each RCPT (and may replace it).
A check declares in `needs` what it reads, so a message nobody watches costs nothing extra.

Checks are shared by every session: what they learn about one session or transaction goes in
SessionInfo.facts or Envelope.facts (keyed by the check's name), which the pipeline owns.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..headers import HeaderSection
from ..policy.state import StateUnavailable
from ..policy.verdict import Action, Verdict
from ..replies import Reply

log = logging.getLogger("relayproxy.checks")


class Need(enum.Enum):
    HEADERS = "headers"  # on_headers: the parsed header section
    BODY = "body"  # body_observer: the body, streamed
    # adds header fields at end of data: the message is held (server.hold_bytes) so they can
    # still go on top of it
    END_HEADERS = "end_headers"


@dataclass(slots=True)
class SessionInfo:
    session_id: str
    client_ip: str
    client_port: int
    helo: str = ""
    esmtp: bool = False
    tls: bool = False
    # forward-confirmed reverse DNS name: None while not looked up yet, "" if there is none
    client_name: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # per session, by check name
    # the reverse lookup, awaitable: the name, or [UNAVAILABLE] / [TEMPUNAVAIL]
    name_lookup: Callable[[], Awaitable[str]] | None = field(default=None, repr=False)


@dataclass(slots=True)
class Envelope:
    sender: str = ""
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # per transaction, by check name
    log_fields: dict[str, str] = field(default_factory=dict)  # added to its log line


@dataclass(slots=True)
class MessageInfo:
    """What the DATA phase found, for the end-of-data checks."""

    size: int  # octets as the client sent them (dot-stuffed)
    bare_newline: bool = False
    line_too_long: bool = False
    normalized: bool = False  # bare newlines were turned into CRLF (server.bare_newline)
    header_too_big: bool = False  # over server.max_header_size
    eight_bit: bool = False  # 8-bit content for a downstream without 8BITMIME
    headers: HeaderSection | None = None
    # the header section has left for the downstream (too big for the held window): fields
    # can no longer be added, and the end-of-data verdict still decides at the withheld dot
    headers_sent: bool = False


class BodyObserver:
    """One message's view of the body stream. Override what you need."""

    async def feed(self, chunk: bytes) -> None:
        """The next part of the body, as message bytes."""

    async def end(self, message: MessageInfo) -> Verdict | None:
        """The end of data: the verdict (fields may be prepended while not headers_sent)."""
        return None

    def headers_leaving(self, headers: HeaderSection) -> None:
        """The header section goes downstream now, before the end of data: the last moment
        to add fields, or replace one prepended at on_headers, with what is known by now
        (never a result not computed yet: what needs the whole body is decided at end,
        unwritten). Not called for a message that ends within the held window (end may still
        write); a check that raises here tempfails the message at its end."""

    def abort(self) -> None:
        """The message was refused or cut off before its end: release what it holds."""


class Check:
    """Base class: every stage lets the conversation go on."""

    name = "check"
    needs: frozenset[Need] = frozenset()  # a class may set it per instance (rules engine)
    # hooks it overrides but has nothing to do in, for its configuration (set per instance):
    # the pipeline does not call them, one coroutine less per message each
    idle: frozenset[str] = frozenset()
    # True for checks that decide at once or bound their own waits: no deadline timer per call
    instant = False

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

    async def on_rcpt_reply(
        self, session: SessionInfo, envelope: Envelope, recipient: str, reply: Reply
    ) -> Verdict | None:
        """The downstream answered this RCPT (reply.source == "downstream"). A verdict here
        replaces that answer for the client (a dictionary attack ending in 421, greylisting)."""
        return None

    async def on_headers(
        self, session: SessionInfo, envelope: Envelope, headers: HeaderSection
    ) -> Verdict | None:
        return None

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        return None

    async def on_data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        return None


# Not frozen: a frozen dataclass's __init__ costs 4k instructions more, per observer and
# message (nothing writes one after it is made).
@dataclass(slots=True)
class Observing:
    """A check's observer of one message, with the deadline of each of its calls (None: the
    check bounds its own waits)."""

    name: str
    observer: BodyObserver
    deadline: float | None


class _Failed(BodyObserver):
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict

    async def end(self, message: MessageInfo) -> Verdict | None:
        return self.verdict


_STAGES = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_rcpt_reply", "on_headers",
           "on_data_end")


def check_failed(check: str, stage: str, exc: BaseException) -> Verdict:
    """A check that raises never ends the session as an internal error: it tempfails."""
    log.error("check %s failed at %s: %r", check, stage, exc, exc_info=exc)
    return Verdict.tempfail("Temporary failure in message checks, try again later", 451,
                            "4.3.0", check=check)


def state_failed(check: str, stage: str, exc: StateUnavailable) -> Verdict | None:
    """Shared state (Redis) unreachable (the store logged and counted it): per state.on_error,
    the check passes, or a temporary refusal; at connect, 421 (the only 4xx that may take the
    banner's place)."""
    log.debug("check %s at %s: %s", check, stage, exc)
    if exc.fail_open:
        return None
    if stage == "connect":
        return Verdict(Action.DISCONNECT, "Shared state unavailable, try again later", 421,
                       "4.3.0", check=check)
    return Verdict.tempfail("Shared state unavailable, try again later", 451, "4.3.0",
                            check=check)


def failure(check: str, stage: str, exc: Exception, deadline: float | None) -> Verdict | None:
    """The verdict for a check that raised: its deadline passed, shared state is unreachable
    (state.on_error decides), or anything else (a tempfail, never an internal error)."""
    if isinstance(exc, TimeoutError) and deadline is not None:
        return check_failed(check, stage, TimeoutError(f"no verdict within {deadline:g}s"))
    if isinstance(exc, StateUnavailable):
        return state_failed(check, stage, exc)
    return check_failed(check, stage, exc)


async def guarded(check: str, stage: str, call: Awaitable[Verdict | None],
                  deadline: float | None) -> Verdict | None:
    """A check's verdict within its deadline; one that raises or overruns tempfails."""
    try:
        if deadline is None:
            return await call
        async with asyncio.timeout(deadline):
            return await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return failure(check, stage, exc, deadline)


class Pipeline:
    """Runs the checks of a stage in order; the first refusing verdict wins."""

    def __init__(self, checks: list[Check], deadline: float = 30.0):
        self.checks = tuple(checks)
        self.deadline = deadline  # for each check's answer at each stage
        # Only checks that override a stage are called for it: most stages of most checks are
        # no-ops and the per-message path should not pay for them.
        self._by_stage = {
            stage: tuple(c for c in checks if getattr(type(c), stage) is not getattr(Check, stage)
                         and stage not in c.idle)
            for stage in _STAGES
        }
        # each stage's bound hooks, looked up once
        self._hooks: dict[str, tuple[tuple[Check, Callable[..., Awaitable[Verdict | None]]],
                                     ...]] = {
            stage: tuple((c, getattr(c, stage)) for c in found)
            for stage, found in self._by_stage.items()}
        self.observing = tuple(
            c for c in checks if Need.BODY in c.needs
            and type(c).body_observer is not Check.body_observer
        )
        self.wants_headers = bool(self._by_stage["on_headers"]) or any(
            Need.HEADERS in c.needs for c in checks)
        self.adds_end_headers = any(Need.END_HEADERS in c.needs for c in checks)

    async def _stage(self, hook: str, label: str, *args: Any) -> Verdict | None:
        """Ask the checks that override hook, in order; the first verdict wins. A check that
        raises or overruns the deadline tempfails (see guarded), inline here rather than
        through guarded: two coroutines less per check and stage, on every message."""
        for check, bound in self._hooks[hook]:
            try:
                if check.instant:  # it never waits, or bounds its own waits: no timer
                    verdict = await bound(*args)
                else:
                    async with asyncio.timeout(self.deadline):
                        verdict = await bound(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                verdict = failure(check.name, label, exc,
                                  None if check.instant else self.deadline)
            if verdict is not None:
                return verdict
        return None

    def connect(self, session: SessionInfo) -> Awaitable[Verdict | None]:
        return self._stage("on_connect", "connect", session)

    def helo(self, session: SessionInfo) -> Awaitable[Verdict | None]:
        return self._stage("on_helo", "helo", session)

    def mail(self, session: SessionInfo, envelope: Envelope) -> Awaitable[Verdict | None]:
        return self._stage("on_mail", "mail", session, envelope)

    def rcpt(self, session: SessionInfo, envelope: Envelope, recipient: str
             ) -> Awaitable[Verdict | None]:
        return self._stage("on_rcpt", "rcpt", session, envelope, recipient)

    def rcpt_reply(self, session: SessionInfo, envelope: Envelope, recipient: str,
                   reply: Reply) -> Awaitable[Verdict | None]:
        return self._stage("on_rcpt_reply", "rcpt", session, envelope, recipient, reply)

    def headers(self, session: SessionInfo, envelope: Envelope, headers: HeaderSection
                ) -> Awaitable[Verdict | None]:
        return self._stage("on_headers", "headers", session, envelope, headers)

    def observers(self, session: SessionInfo, envelope: Envelope) -> list[Observing]:
        found = []
        for check in self.observing:
            try:
                observer = check.body_observer(session, envelope)
            except Exception as exc:
                observer = _Failed(check_failed(check.name, "body", exc))
            if observer is not None:
                found.append(Observing(check.name, observer,
                                       None if check.instant else self.deadline))
        return found

    def data_end(self, session: SessionInfo, envelope: Envelope, message: MessageInfo
                 ) -> Awaitable[Verdict | None]:
        return self._stage("on_data_end", "data", session, envelope, message)
