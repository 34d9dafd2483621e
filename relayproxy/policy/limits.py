"""Rate limits (`[[limit]]` tables), as a check.

A limit counts events of one kind per key within a sliding window (relayproxy.policy.state) and
refuses the event that takes the count over `max`. Refused events count too, so a client that
keeps hammering stays over until it backs off for a whole window.

  - connections: counted at connect, per client_net only. Over max: tempfail is
    "421 4.7.0" and the connection is closed at once (the only reply that may replace the
    greeting and close: RFC 5321 3.8); reject is "554 5.7.1" (RFC 5321 3.1), closed too.
  - messages: counted at MAIL (every message attempt), per client_net, sender or
    sender_domain. Over max: "451 4.7.1 Too many messages, slow down" (reject: 550 5.7.1).
  - recipients: counted at every RCPT, likewise: "451 4.7.1 Too many recipients, slow down".
  - unknown_recipients: counted when the downstream refuses a RCPT with a 5xx (and, with a
    RecipientCache given to Limits, when the cache refuses one for it). Over max: "421 4.7.0
    Too many unknown recipients, closing connection": a client probing addresses is cut off, so
    the only action is tempfail, and a custom reply must be a 421.

Keys are "limit:<name>:<value>": the client network (the IPv4 /ipv4_prefix or IPv6
/ipv6_prefix holding the client address, an IPv4-mapped IPv6 address taken as IPv4), the sender
(lower-cased: a limit must not be dodged by changing case; the null sender is "<>"), or the
sender's domain (lower-case A-labels; "<>" for the null sender).

block_for: a limit going over blocks its key for that long. A blocked client_net is refused
"421 4.7.0" at connect, and at the next MAIL or RCPT of the sessions already open; a blocked
sender or sender_domain gets "451 4.7.1" at MAIL and RCPT (a block ends, so it is never 5xx).

monitor: the limit counts and reports (on_hit(limit, False)) but never refuses nor blocks.
on_hit(limit, True) reports every refusal a limit makes, its blocks included; the caller
counts and logs them. Refusals carry source "rule" (limits live in the rule files).

The recipient-verdict cache and greylisting are in relayproxy.policy.recipients; the keys
and value checks they share with the limits, in relayproxy.policy.state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from ..checks.base import Check, Envelope, SessionInfo
from ..replies import Reply
from .recipients import RecipientCache
from .state import Store, address_key, client_net, int_in, is_number
from .verdict import Action, Verdict

COUNTS: Final = ("connections", "messages", "recipients", "unknown_recipients")
PER: Final = ("client_net", "sender", "sender_domain")
ACTIONS: Final = ("tempfail", "reject")

# counts whose tempfail closes the connection (so its reply must be a 421)
_CLOSING: Final = ("connections", "unknown_recipients")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REPLY = re.compile(r"([45])(\d\d) ([45]\.\d{1,3}\.\d{1,3}) (\S.*)")
_WHAT: Final = {
    "connections": "connections",
    "messages": "messages",
    "recipients": "recipients",
    "unknown_recipients": "unknown recipients",
}
_EXCEEDED: Final = {
    ("connections", "tempfail"):
        "421 4.7.0 Too many connections from your network, try again later",
    ("connections", "reject"): "554 5.7.1 Too many connections from your network",
    ("messages", "tempfail"): "451 4.7.1 Too many messages, slow down",
    ("messages", "reject"): "550 5.7.1 Too many messages",
    ("recipients", "tempfail"): "451 4.7.1 Too many recipients, slow down",
    ("recipients", "reject"): "550 5.7.1 Too many recipients",
    ("unknown_recipients", "tempfail"): "421 4.7.0 Too many unknown recipients, closing connection",
}


@dataclass(frozen=True, slots=True)
class Limit:
    """One `[[limit]]` table, validated (ValueError "limit <name>: <key>: <problem>")."""

    name: str
    count: str
    per: str
    max: int
    window: float
    action: str = "tempfail"
    reply: str = ""
    block_for: float = 0
    monitor: bool = False
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise _error(self.name if isinstance(self.name, str) and self.name
                         else "<unnamed>", *problem)

    def _problem(self) -> tuple[str, str] | None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            return "name", "must be letters, digits, '.', '_' and '-'"
        if self.count not in COUNTS:
            return "count", f"must be one of {', '.join(COUNTS)}"
        if self.per not in PER:
            return "per", f"must be one of {', '.join(PER)}"
        if self.count == "connections" and self.per != "client_net":
            return "per", "connections are counted per client_net only"
        if not int_in(self.max, 1, 2**62):
            return "max", "must be a positive integer"
        if not is_number(self.window) or self.window <= 0:
            return "window", "must be a positive number of seconds"
        if self.action not in ACTIONS:
            return "action", "must be tempfail or reject"
        if self.count == "unknown_recipients" and self.action != "tempfail":
            return "action", "unknown_recipients closes the connection: tempfail only"
        if not isinstance(self.reply, str):
            return "reply", "must be a string"
        if self.reply and (problem := _reply_problem(self.reply, self.count, self.action)):
            return "reply", problem
        if not is_number(self.block_for) or self.block_for < 0:
            return "block_for", "must be a number of seconds, 0 or more"
        if not isinstance(self.monitor, bool):
            return "monitor", "must be true or false"
        for key, value, bits, default in (("ipv4_prefix", self.ipv4_prefix, 32, 32),
                                          ("ipv6_prefix", self.ipv6_prefix, 128, 64)):
            if not int_in(value, 0, bits):
                return key, f"must be an integer from 0 to {bits}"
            if self.per != "client_net" and value != default:
                return key, 'only with per = "client_net"'
        return None

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Limit:
        name = table.get("name")
        label = name if isinstance(name, str) and name else "<unnamed>"
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise _error(label, key, "unknown key")
        for key in ("name", "count", "per", "max", "window"):
            if key not in table:
                raise _error(label, key, "required")
        return cls(**table)


def _error(name: object, key: str, problem: str) -> ValueError:
    return ValueError(f"limit {name}: {key}: {problem}")


def _reply_problem(reply: str, count: str, action: str) -> str | None:
    m = _REPLY.fullmatch(reply)
    if m is None or m.group(1) != m.group(3)[0] or not m.group(4).isprintable():
        return (f"{reply!r} is not a reply like '451 4.7.1 Text' "
                "(code and enhanced code of one class)")
    if m.group(1) != ("5" if action == "reject" else "4"):
        return f"a {action} needs a {'5' if action == 'reject' else '4'}xx reply"
    if count in _CLOSING and action == "tempfail" and m.group(1) + m.group(2) != "421":
        return f"{count} closes the connection: the reply must be a 421"
    return None


def _verdict(reply: str, source: str, check: str) -> Verdict:
    code, enhanced, text = reply.split(" ", 2)
    number = int(code)
    # 421 is the reply that closes the session
    action = (Action.DISCONNECT if number == 421
              else Action.REJECT if number >= 500 else Action.TEMPFAIL)
    return Verdict(action, text, number, enhanced, source, check)


def _subject(limit: Limit, session: SessionInfo, envelope: Envelope | None) -> str:
    if limit.per == "client_net":
        return client_net(session.client_ip, limit.ipv4_prefix, limit.ipv6_prefix)
    sender = address_key(envelope.sender if envelope is not None else "", True)
    if limit.per == "sender" or sender == "<>":
        return sender
    return sender.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class _Armed:
    """A limit with its replies made."""

    limit: Limit
    exceeded: Verdict
    blocked: Verdict

    def key(self, session: SessionInfo, envelope: Envelope | None) -> str:
        return f"limit:{self.limit.name}:{_subject(self.limit, session, envelope)}"


class Limits(Check):
    """Every `[[limit]]` of the rule files, as one check (see the module docstring)."""

    name = "limits"
    # the in-process store answers at once; a shared store bounds its own calls
    instant = True
    source = "rule"

    def __init__(self, limits: Sequence[Limit], store: Store, *,
                 recipient_cache: RecipientCache | None = None,
                 on_hit: Callable[[Limit, bool], None] | None = None) -> None:
        seen: set[str] = set()
        armed = []
        for limit in limits:
            if limit.name in seen:  # two limits would share their counters
                raise _error(limit.name, "name", "used by two limits")
            seen.add(limit.name)
            what = _WHAT[limit.count]
            if limit.per == "client_net":
                blocked = f"421 4.7.0 Too many {what} from your network, try again later"
            else:
                blocked = f"451 4.7.1 Too many {what} from this sender, try again later"
            exceeded = limit.reply or _EXCEEDED[limit.count, limit.action]
            armed.append(_Armed(limit, _verdict(exceeded, self.source, self.name),
                                _verdict(blocked, self.source, self.name)))
        self.limits = tuple(limits)
        self.store = store
        self.recipient_cache = recipient_cache
        self.on_hit = on_hit
        self._counted = {count: tuple(a for a in armed if a.limit.count == count)
                         for count in COUNTS}
        self._blocking = tuple(a for a in armed if a.limit.block_for > 0 and not a.limit.monitor)
        self._net_blocking = tuple(a for a in self._blocking if a.limit.per == "client_net")

    async def on_connect(self, session: SessionInfo) -> Verdict | None:
        return (await self._blocked(self._net_blocking, session, None)
                or await self._count("connections", session, None))

    async def on_mail(self, session: SessionInfo, envelope: Envelope) -> Verdict | None:
        return (await self._blocked(self._blocking, session, envelope)
                or await self._count("messages", session, envelope))

    async def on_rcpt(
        self, session: SessionInfo, envelope: Envelope, recipient: str
    ) -> Verdict | None:
        refusal = (await self._blocked(self._blocking, session, envelope)
                   or await self._count("recipients", session, envelope))
        if refusal is not None or self.recipient_cache is None:
            return refusal
        cached = await self.recipient_cache.refusal(recipient)
        if cached is None:
            return None
        return await self._count("unknown_recipients", session, envelope) or cached

    async def on_rcpt_reply(
        self, session: SessionInfo, envelope: Envelope, recipient: str, reply: Reply
    ) -> Verdict | None:
        if self.recipient_cache is not None:
            await self.recipient_cache.record(recipient, reply)
        if reply.code >= 500 and reply.source == "downstream":
            return await self._count("unknown_recipients", session, envelope)
        return None

    async def _blocked(self, armed: tuple[_Armed, ...], session: SessionInfo,
                       envelope: Envelope | None) -> Verdict | None:
        for limit in armed:
            if await self.store.blocked(limit.key(session, envelope)) > 0:
                self._report(limit.limit, True)
                return limit.blocked
        return None

    async def _count(self, count: str, session: SessionInfo,
                     envelope: Envelope | None) -> Verdict | None:
        """Count the event for every limit of its kind (all of them count, whichever refuses);
        the first refusal."""
        refusal = None
        for armed in self._counted[count]:
            limit = armed.limit
            key = armed.key(session, envelope)
            if await self.store.hit(key, limit.window) <= limit.max:
                continue
            self._report(limit, not limit.monitor)
            if limit.monitor:
                continue
            if limit.block_for > 0:
                await self.store.block(key, limit.block_for)
            refusal = refusal or armed.exceeded
        return refusal

    def _report(self, limit: Limit, enforced: bool) -> None:
        if self.on_hit is not None:
            self.on_hit(limit, enforced)


# RFC 3463 statuses that are about the recipient address alone, whoever asks
