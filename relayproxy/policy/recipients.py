"""The downstream's answers about recipients, remembered: the refusal cache and greylisting.

RecipientCache remembers the downstream's answers to RCPT, as Postfix's address verification
cache does: a recipient it refused with an address status (by default 5.1.1 bad mailbox,
5.1.2 bad domain, 5.1.3 bad syntax, 5.1.6 moved, 5.1.10 null MX and 5.2.1 disabled) is refused
again from the cache for negative_ttl (600 s: a new mailbox works within ten minutes, and a
dictionary attack is answered without the downstream), and accepted recipients are recorded
for positive_ttl (3600 s; for greylisting, nothing reads them yet). Other 5xx (5.7.1 relay
denied, policy) may depend on the client or the sender and 4xx are temporary: never cached. The
key is the recipient with its domain lower-cased (A-labels) and its local part as written: the
downstream may tell local parts apart by case (RFC 5321 2.4). A cached refusal keeps the
downstream's code, enhanced code and first line of text, and its source is "downstream", so
metrics labels stay the same set. Give the cache to Limits (which then consults and fills it,
and counts its refusals as unknown recipients) or put it in the pipeline alone: not both.

Greylist (RFC 6647) tempfails the first RCPT of a triplet (client_net, sender, recipient)
once the downstream has accepted that recipient (the session then restarts the downstream
transaction without it), with "451 4.7.1 Greylisted, try again in N seconds". A retry after
`delay` (300 s) and within `retry_window` (4 h) of the first attempt passes and lets the triplet
through for `expire` (36 days) since its last use. The client network is an IPv4 /24 by default
(RFC 6647 4.2: large senders retry from another address of a pool), and its first-attempt times
are wall-clock, so a shared store works across processes.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection
from typing import Final

from ..checks.base import Check, Envelope, SessionInfo
from ..replies import Reply
from .state import Store, address_key, client_net, int_in, is_number
from .verdict import Verdict

DEFAULT_NEGATIVE_STATUSES: Final = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10",
                                              "5.2.1"})


class RecipientCache(Check):
    """The downstream's answers to RCPT, by recipient (see the module docstring).

    negative_statuses=None caches every 5xx; a ttl of 0 caches nothing of that kind.
    """

    name = "recipient_cache"
    instant = True  # as Limits

    def __init__(self, store: Store, *, positive_ttl: float = 3600.0,
                 negative_ttl: float = 600.0,
                 negative_statuses: Collection[str] | None = DEFAULT_NEGATIVE_STATUSES,
                 source: str = "downstream") -> None:
        for key, value in (("positive_ttl", positive_ttl), ("negative_ttl", negative_ttl)):
            if not is_number(value) or value < 0:
                raise ValueError(f"recipient cache: {key}: must be a number of seconds, 0 or more")
        self.store = store
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.negative_statuses = (None if negative_statuses is None
                                  else frozenset(negative_statuses))
        self.source = source

    async def lookup(self, recipient: str) -> Reply | None:
        """The cached answer for recipient, accepting or refusing; None if there is none."""
        value = await self.store.get(_cache_key(recipient))
        return None if value is None else self._reply(value)

    async def refusal(self, recipient: str) -> Verdict | None:
        """A refusal for a recipient the downstream is known to refuse."""
        return self._refusal(await self.lookup(recipient))

    def _reply(self, value: str) -> Reply:
        code, enhanced, text = value.split(" ", 2)
        return Reply(int(code), enhanced, text, source=self.source)

    def _refusal(self, cached: Reply | None) -> Verdict | None:
        if cached is None or cached.code < 500:
            return None
        return Verdict.reject(cached.text, cached.code, cached.enhanced, self.source, self.name)

    async def record(self, recipient: str, reply: Reply) -> None:
        """Remember the downstream's answer to RCPT, if it is one to remember."""
        if reply.source != "downstream":
            return
        if 200 <= reply.code < 300:
            ttl = self.positive_ttl
        elif reply.code >= 500 and (self.negative_statuses is None
                                    or reply.enhanced in self.negative_statuses):
            ttl = self.negative_ttl
        else:
            return
        if ttl > 0:
            value = f"{reply.code} {reply.enhanced or str(reply.code)[0] + '.0.0'} {reply.text}"
            await self.store.put(_cache_key(recipient), value, ttl)

    async def on_rcpt(
        self, session: SessionInfo, envelope: Envelope, recipient: str
    ) -> Verdict | None:
        # the store itself, not through refusal() and lookup(): at every RCPT, two
        # coroutines less
        value = await self.store.get(_cache_key(recipient))
        return None if value is None else self._refusal(self._reply(value))

    async def on_rcpt_reply(
        self, session: SessionInfo, envelope: Envelope, recipient: str, reply: Reply
    ) -> Verdict | None:
        if 300 <= reply.code < 500 or (reply.code < 300 and not self.positive_ttl):
            return None  # nothing to remember (the usual 250 when only refusals are kept)
        await self.record(recipient, reply)
        return None


# at every RCPT: the key's A-label conversion costs more than the store's lookup, and a
# client sends the same few recipients again and again (bounded: it chooses them)
@functools.lru_cache(maxsize=4096)
def _cache_key(recipient: str) -> str:
    return "rcpt:" + address_key(recipient, False)


_PASSED: Final = "passed"


class Greylist(Check):
    """RFC 6647 greylisting of accepted recipients (see the module docstring)."""

    name = "greylist"
    source = "rule"

    def __init__(self, store: Store, *, delay: float = 300.0, retry_window: float = 4 * 3600.0,
                 expire: float = 36 * 86400.0, ipv4_prefix: int = 24, ipv6_prefix: int = 64,
                 clock: Callable[[], float] = time.time) -> None:
        for key, value in (("delay", delay), ("retry_window", retry_window), ("expire", expire)):
            if not is_number(value) or value < 0:
                raise ValueError(f"greylist: {key}: must be a number of seconds, 0 or more")
        if retry_window <= delay:
            raise ValueError("greylist: retry_window: must be longer than delay")
        if expire <= 0:
            raise ValueError("greylist: expire: must be positive")
        if not int_in(ipv4_prefix, 0, 32):
            raise ValueError("greylist: ipv4_prefix: must be an integer from 0 to 32")
        if not int_in(ipv6_prefix, 0, 128):
            raise ValueError("greylist: ipv6_prefix: must be an integer from 0 to 128")
        self.store = store
        self.delay = delay
        self.retry_window = retry_window
        self.expire = expire
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.clock = clock

    async def on_rcpt_reply(
        self, session: SessionInfo, envelope: Envelope, recipient: str, reply: Reply
    ) -> Verdict | None:
        # only recipients the downstream accepted: greylisting a refused one would hide why
        if reply.source != "downstream" or not 200 <= reply.code < 300:
            return None
        net = client_net(session.client_ip, self.ipv4_prefix, self.ipv6_prefix)
        key = (f"grey:{net}:{address_key(envelope.sender, True)}:"
               f"{address_key(recipient, True)}")
        seen = await self.store.get(key)
        now = self.clock()
        if seen == _PASSED:
            await self.store.put(key, _PASSED, self.expire)  # expire counts from the last use
            return None
        first = _float(seen)
        if first is None or not first <= now < first + self.retry_window:
            await self.store.put(key, repr(now), self.retry_window)
            first = now
        elif now - first >= self.delay:
            await self.store.put(key, _PASSED, self.expire)
            return None
        wait = math.ceil(first + self.delay - now)
        return Verdict.tempfail(f"Greylisted, try again in {wait} seconds", 451, "4.7.1",
                                self.source, self.name)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
