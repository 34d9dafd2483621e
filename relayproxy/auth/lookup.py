"""DNS answers for the authentication methods, from the shared async resolver.

The libraries (pyspf, dkimpy) are synchronous: they are handed answers fetched here, never a
resolver of their own, so every query goes to dns.nameservers and none blocks the event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from functools import lru_cache

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


_MEMO_ENTRIES = 4096
# (resolver, name, type) -> (expiry, answer): what the resolver's cache said, until the
# answer's own expiry; dnspython's cache compares names under a lock, which costs more than
# the rest of a cached lookup
_memo: OrderedDict[tuple[int, str, str], tuple[float, dns.resolver.Answer | None]] = (
    OrderedDict())


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
        if memo[0] > time.time():
            return True, memo[1], memo[0]
        del _memo[key]
    found, answer, expiry = _from_cache(resolver, name, rdtype)
    if found:
        _memo[key] = (expiry, answer)
        while len(_memo) > _MEMO_ENTRIES:
            _memo.popitem(last=False)
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


_txt_memo: OrderedDict[tuple[int, str], tuple[float, list[bytes]]] = OrderedDict()


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
        if memo[0] > time.time():
            return memo[1], memo[0]
        del _txt_memo[key]
    found, answer, expiry = cached_until(resolver, name, "TXT")
    if not found:
        return None, 0.0
    records = [b"".join(r.strings) for r in answer] if answer is not None else []
    _txt_memo[key] = (expiry, records)
    while len(_txt_memo) > _MEMO_ENTRIES:
        _txt_memo.popitem(last=False)
    return records, expiry
