"""DNS answers for the authentication methods, from the shared async resolver.

The libraries (pyspf, dkimpy) are synchronous: they are handed answers fetched here, never a
resolver of their own, so every query goes to dns.nameservers and none blocks the event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from functools import lru_cache
from typing import Generic, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

# a name that cannot exist (an empty or overlong label) has no records either
_NOT_FOUND = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.name.EmptyLabel,
              dns.name.LabelTooLong, dns.name.NameTooLong)


K = TypeVar("K")
V = TypeVar("V")


class TempDNSError(Exception):
    """A lookup failed for now (timeout, SERVFAIL, refused): temperror, not "none"."""


async def txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[bytes]:
    """The TXT records of name, each record's strings joined; [] when there are none."""
    known = cached_txt(resolver, name)
    if known is not None:
        return known
    try:
        answer = await resolver.resolve(name, "TXT")
    except _NOT_FOUND:
        return []
    except (dns.exception.DNSException, OSError) as exc:
        raise TempDNSError(f"{name}: {exc}") from None
    return [b"".join(r.strings) for r in answer]


_IN = dns.rdataclass.IN


class Expiring(Generic[K, V]):
    """key -> value, each until its own time (time.time()): what DNS answers decide holds as
    long as the first answer it read. The oldest entries go past `entries`."""

    __slots__ = ("_data", "_entries")

    def __init__(self, entries: int) -> None:
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._entries = entries

    def get(self, key: K) -> tuple[float, V] | None:
        """(expiry, value) while it holds, else None."""
        memo = self._data.get(key)
        if memo is not None:
            if memo[0] > time.time():
                return memo
            del self._data[key]
        return None

    def put(self, key: K, expiry: float, value: V) -> None:
        self._data[key] = (expiry, value)
        while len(self._data) > self._entries:
            self._data.popitem(last=False)


_MEMO_ENTRIES = 4096
# (resolver, name, type) -> answer: what the resolver's cache said, until the answer's own
# expiry; dnspython's cache compares names under a lock, which costs more than the rest of a
# cached lookup
_memo: Expiring[tuple[int, str, str], dns.resolver.Answer | None] = Expiring(_MEMO_ENTRIES)


def cached(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
           ) -> tuple[bool, dns.resolver.Answer | None]:
    """(found, answer) from the resolver's cache, without a query or a coroutine: answer is
    None for a cached NXDOMAIN or NODATA. Most messages come from senders seen a moment ago,
    and skipping the resolver's machinery for them is most of what authentication costs."""
    found, answer, _expiry = cached_until(resolver, name, rdtype)
    return found, answer


def cached_until(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
                 ) -> tuple[bool, dns.resolver.Answer | None, float]:
    """cached(), with the time (time.time()) until which the cache keeps the answer."""
    key = (id(resolver), name, rdtype)
    memo = _memo.get(key)
    if memo is not None:
        return True, memo[1], memo[0]
    found, answer, expiry = _from_cache(resolver, name, rdtype)
    if found:
        _memo.put(key, expiry, answer)
    return found, answer, expiry


def _from_cache(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
                ) -> tuple[bool, dns.resolver.Answer | None, float]:
    cache = resolver.cache
    if cache is None:
        return False, None, 0.0
    qname = _qname(name)
    if qname is None:
        return False, None, 0.0
    rdtype_value = dns.rdatatype.from_text(rdtype)
    answer = cache.get((qname, rdtype_value, _IN))
    if answer is not None:
        return True, answer if answer.rrset is not None else None, answer.expiration
    negative = cache.get((qname, dns.rdatatype.ANY, _IN))
    if negative is not None and negative.response.rcode() == dns.rcode.NXDOMAIN:
        return True, None, negative.expiration
    return False, None, 0.0


@lru_cache(maxsize=4096)
def _qname(name: str) -> dns.name.Name | None:
    # parsing a name costs more than the cache lookup it is for
    try:
        return dns.name.from_text(name)
    except dns.exception.DNSException:
        return None


_txt_memo: Expiring[tuple[int, str], list[bytes]] = Expiring(_MEMO_ENTRIES)


def cached_txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[bytes] | None:
    """txt() from the cache; None when the cache does not know. The same list (not to be
    changed) until the answer expires: the records of a signer's key and of a domain's
    DMARC policy are read for every message."""
    records, _expiry = cached_txt_until(resolver, name)
    return records


def cached_txt_until(resolver: dns.asyncresolver.Resolver, name: str
                     ) -> tuple[list[bytes] | None, float]:
    """cached_txt(), with the time (time.time()) until which the cache keeps the answer."""
    key = (id(resolver), name)
    memo = _txt_memo.get(key)
    if memo is not None:
        return memo[1], memo[0]
    found, answer, expiry = cached_until(resolver, name, "TXT")
    if not found:
        return None, 0.0
    records = [b"".join(r.strings) for r in answer] if answer is not None else []
    _txt_memo.put(key, expiry, records)
    return records, expiry
