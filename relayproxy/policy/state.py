"""Shared counters, blocks and small values for rate limits, caches and greylisting.

Store is the interface the checks use; it is async and key/value shaped so that a Redis store
(shared by several proxies, relayproxy.policy.redis_store) stands in for MemoryStore (one
process) without the checks changing. hit/count, block/blocked and get/put are three separate
namespaces: the same key in each is a different entry (a Redis store prefixes its keys
accordingly).

MemoryStore's sliding window is a ring of `buckets` sub-window counters per key (default 20),
so a key costs the same memory however fast it is hit. Counts are exact; time has the
resolution of one sub-window: an event stops counting between window * (1 - 1/buckets) and
window after it happened, so a limit is never stricter than an exact sliding window and at most
one sub-window more lenient. A key is meant to be used with one window (its name says which
limit it counts for); hit with another window starts that key over.

The number of keys is bounded (max_keys): when full, the expired entries go first, then the
least recently used ones, a sixteenth of the store at once so that the sweep (a pass over all
keys) is paid for by as many insertions.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from ..address import PathError, ascii_domain


class StateUnavailable(Exception):
    """A shared store could not answer. The checks' pipeline answers it per state.on_error:
    a temporary refusal, or (fail_open) the check passes."""

    def __init__(self, message: str, fail_open: bool = False) -> None:
        super().__init__(message)
        self.fail_open = fail_open


class Store(Protocol):
    async def hit(self, key: str, window: float, amount: int = 1) -> int:
        """Record `amount` events now; the events within the sliding window, these included."""
        ...

    async def count(self, key: str, window: float) -> int:
        """The events within the sliding window, recording none."""
        ...

    async def block(self, key: str, seconds: float) -> None:
        """Block key for `seconds` from now (an existing longer block is kept)."""
        ...

    async def blocked(self, key: str) -> float:
        """Seconds left of key's block; 0 if it is not blocked."""
        ...

    async def get(self, key: str) -> str | None:
        ...

    async def put(self, key: str, value: str, ttl: float) -> None:
        """Set key to value for `ttl` seconds."""
        ...


class _Entry:
    __slots__ = ("expires",)

    def __init__(self, expires: float) -> None:
        self.expires = expires


class _Value(_Entry):
    """A value or a block (its value unused) that lives until `expires`."""

    __slots__ = ("value",)

    def __init__(self, value: str, expires: float) -> None:
        super().__init__(expires)
        self.value = value


class _Window(_Entry):
    """Event counts of the last len(counts) sub-windows; `last` is the newest one's number."""

    __slots__ = ("counts", "last", "width")

    def __init__(self, width: float, buckets: int, now: float) -> None:
        super().__init__(0.0)  # set by the first hit
        self.width = width
        self.last = math.floor(now / width)
        self.counts = array("q", [0]) * buckets

    def advance(self, now: float) -> None:
        """Move the ring to now, zeroing the sub-windows that have slid out."""
        current = math.floor(now / self.width)
        buckets = len(self.counts)
        if current - self.last >= buckets:
            for i in range(buckets):
                self.counts[i] = 0
        else:
            for n in range(self.last + 1, current + 1):
                self.counts[n % buckets] = 0
        self.last = max(self.last, current)


class MemoryStore:
    """A Store in this process's memory (see the module docstring for its accuracy)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000,
                 buckets: int = 20) -> None:
        if max_keys < 1:
            raise ValueError("max_keys: must be at least 1")
        if buckets < 1:
            raise ValueError("buckets: must be at least 1")
        self.clock = clock
        self.max_keys = max_keys
        self.buckets = buckets
        # one order for all namespaces ("h", "b", "v" + key): the least recently used first
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def hit(self, key: str, window: float, amount: int = 1) -> int:
        if window <= 0:
            raise ValueError("window: must be positive")
        now = self.clock()
        width = window / self.buckets
        entry = self._live("h" + key, now)
        if not isinstance(entry, _Window) or entry.width != width:
            entry = _Window(width, self.buckets, now)
            self._add("h" + key, entry, now)
        entry.advance(now)
        entry.counts[entry.last % self.buckets] += amount
        # the newest event leaves the window with the sub-window it is in
        entry.expires = (entry.last + self.buckets) * width
        return sum(entry.counts)

    async def count(self, key: str, window: float) -> int:
        now = self.clock()
        entry = self._live("h" + key, now)
        if not isinstance(entry, _Window) or entry.width != window / self.buckets:
            return 0
        entry.advance(now)
        return sum(entry.counts)

    async def block(self, key: str, seconds: float) -> None:
        now = self.clock()
        entry = self._live("b" + key, now)
        if entry is None:
            self._add("b" + key, _Value("", now + seconds), now)
        else:
            entry.expires = max(entry.expires, now + seconds)

    async def blocked(self, key: str) -> float:
        now = self.clock()
        entry = self._live("b" + key, now)
        return 0.0 if entry is None else entry.expires - now

    async def get(self, key: str) -> str | None:
        entry = self._live("v" + key, self.clock())
        return entry.value if isinstance(entry, _Value) else None

    async def put(self, key: str, value: str, ttl: float) -> None:
        now = self.clock()
        self._entries.pop("v" + key, None)
        if ttl > 0:
            self._add("v" + key, _Value(value, now + ttl), now)

    def _live(self, key: str, now: float) -> _Entry | None:
        """The entry under key unless it expired (then it is dropped); it becomes the most
        recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _add(self, key: str, entry: _Entry, now: float) -> None:
        if key not in self._entries and len(self._entries) >= self.max_keys:
            self._evict(now)
        self._entries[key] = entry
        self._entries.move_to_end(key)

    def _evict(self, now: float) -> None:
        target = self.max_keys - max(1, self.max_keys // 16)
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key]
        while len(self._entries) > target:
            self._entries.popitem(last=False)


# the keys limits, the recipient cache and greylisting store under, and the value checks
# their constructors share


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@functools.lru_cache(maxsize=4096)
def client_net(ip: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The network holding ip ("192.0.2.0/24"); something that is no address is its own."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])  # without an IPv6 zone
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((address, ipv4_prefix), strict=False))
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


def _domain(domain: str) -> str:
    try:
        return ascii_domain(domain)
    except PathError:
        return domain.lower()


def address_key(address: str, fold_local: bool) -> str:
    """An address as a key: its domain as lower-case A-labels, its local part lower-cased if
    fold_local; "<>" for the null address."""
    if not address:
        return "<>"
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()  # <postmaster>: case-insensitive (RFC 5321 4.5.1)
    return f"{local.lower() if fold_local else local}@{_domain(domain)}"
