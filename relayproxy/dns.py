"""Asynchronous DNS on the configured nameservers (dns.nameservers), never blocking the loop.

One async resolver for everything (reverse DNS, DNSBLs, later SPF and DKIM): per-query
timeouts, and one TTL-respecting cache that all of them share.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from .config import DNSConfig

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

# Bounds the shared cache: a flood of clients with unique addresses evicts the least recently
# used answers instead of growing memory.
CACHE_ENTRIES = 10_000

_NOT_FOUND = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers)


def make_resolver(config: DNSConfig,
                  cache_entries: int = CACHE_ENTRIES) -> dns.asyncresolver.Resolver:
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        # per-server ports must be known before the nameservers are set: dnspython binds them then
        resolver.nameserver_ports = {hp.host: hp.port for hp in config.nameservers}
        resolver.nameservers = [hp.host for hp in config.nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = config.timeout
    resolver.timeout = config.timeout
    # dnspython keeps each answer for its TTL, and NXDOMAIN/NODATA for the negative TTL of the
    # zone's SOA (RFC 2308 section 5; 300 s without one), so a repeat lookup within it costs
    # no query.
    resolver.cache = dns.resolver.LRUCache(cache_entries)
    return resolver


async def client_name(resolver: dns.asyncresolver.Resolver, ip: str) -> tuple[str, str]:
    """(name, ptr): the forward-confirmed reverse name of ip, as Postfix would verify it.

    name is the PTR name only when one of its A/AAAA records is ip again; otherwise
    [UNAVAILABLE], or [TEMPUNAVAIL] when DNS failed temporarily (XCLIENT's own vocabulary).
    """
    try:
        answer = await resolver.resolve_address(ip)
    except _NOT_FOUND:
        return UNAVAILABLE, ""
    except (dns.exception.DNSException, OSError):
        return TEMPUNAVAIL, ""
    ptr = str(answer[0].target).rstrip(".")
    if not ptr:
        return UNAVAILABLE, ""
    rdtype = "AAAA" if ":" in ip else "A"
    try:
        forward = await resolver.resolve(ptr, rdtype)
    except _NOT_FOUND:
        return UNAVAILABLE, ptr
    except (dns.exception.DNSException, OSError):
        return TEMPUNAVAIL, ptr
    confirmed = any(r.address == ip for r in forward)
    return (ptr if confirmed else UNAVAILABLE), ptr


class ClientNames:
    """Forward-confirmed reverse names by client address: looked up once, cached briefly.

    A busy client opens many connections; each would otherwise cost two lookups before its
    greeting. Concurrent sessions from one address share one lookup. Answers are kept for
    `ttl` seconds, temporary failures (timeouts) for `fail_ttl` only, so a DNS hiccup does not
    stick to a client. The cache is bounded: the oldest entries go first.
    """

    def __init__(self, resolver: dns.asyncresolver.Resolver, ttl: float = 300.0,
                 fail_ttl: float = 30.0, max_entries: int = 10_000) -> None:
        self.resolver = resolver
        self.ttl = ttl
        self.fail_ttl = fail_ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[tuple[str, str]]]] = (
            OrderedDict())

    def lookup(self, ip: str) -> asyncio.Future[tuple[str, str]]:
        """(name, ptr) as client_name gives it; await it (shielded: it is shared)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        entry = self._entries.get(ip)
        if entry is not None and (entry[0] > now or not entry[1].done()):
            self._entries.move_to_end(ip)
            return entry[1]
        future = asyncio.ensure_future(client_name(self.resolver, ip))
        self._entries[ip] = (now + self.ttl, future)
        future.add_done_callback(lambda f: self._settled(ip, f))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return future

    def _settled(self, ip: str, future: asyncio.Future[tuple[str, str]]) -> None:
        entry = self._entries.get(ip)
        if entry is None or entry[1] is not future:
            return
        failed = future.cancelled() or future.exception() is not None or (
            future.result()[0] == TEMPUNAVAIL)
        if failed:
            self._entries[ip] = (asyncio.get_running_loop().time() + self.fail_ttl, future)
