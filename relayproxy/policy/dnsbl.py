"""DNS blocklists (DNSBLs) of client addresses, as RFC 5782 describes them.

Lookups start at connect, for every zone at once, and are awaited when a rule needs them, so a
slow zone costs one timeout per session at most and never blocks the loop. The shared resolver
caches the DNS answers; Dnsbl also keeps what each zone said (failures too, briefly), so a busy
client costs no work and concurrent sessions from one address share one query per zone.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver

# RFC 5782 2.1: a listing is an A record in 127.0.0.0/8; anything else is not a DNSBL answer
# (an NXDOMAIN-rewriting resolver's advertising host, say) and must never count as a listing.
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
# Spamhaus (and others following it) answer from this /24 when they refuse a query rather than
# say anything about the address: these are errors, never listings.
_REFUSALS = ipaddress.IPv4Network("127.255.255.0/24")
_REFUSAL_MEANINGS = {
    252: "typing error in the zone name",
    254: "query refused by the zone",  # through a public/open resolver
    255: "query refused by the zone: too many queries",
}
NEGATIVE_TTL = 300.0  # NXDOMAIN without the zone's SOA, as dnspython uses (RFC 2308 5)
ERROR_TTL = 30.0  # a failed lookup is retried this soon: a DNS hiccup must not stick

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_MAX_NAME = 253
# An IPv6 query name puts 32 nibble labels (64 characters) in front of the zone (RFC 5782 2.4)
_MAX_ZONE = _MAX_NAME - 64


@dataclass(frozen=True, slots=True)
class DnsblZone:
    zone: str  # e.g. "zen.spamhaus.org": lower case, no trailing dot
    # inclusive ranges of A records (as ints) that count as listed; () = any in 127.0.0.0/8
    codes: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any]) -> DnsblZone:
        """From "zone" or {"zone": "zone", "codes": ["127.0.0.2-127.0.0.11", "127.0.0.4"]}."""
        if isinstance(spec, str):
            return cls(_parse_zone(spec))
        if not isinstance(spec, Mapping):
            raise ValueError(f"a DNSBL must be a zone name or a table, not {spec!r}")
        unknown = sorted(set(spec) - {"zone", "codes"})
        if unknown:
            raise ValueError(f"DNSBL: unknown key(s) {', '.join(map(str, unknown))}; "
                             "expected zone and codes")
        if "zone" not in spec:
            raise ValueError(f"DNSBL {dict(spec)!r}: zone is missing")
        zone = _parse_zone(spec["zone"])
        codes = spec.get("codes", [])
        if not isinstance(codes, list | tuple) or (not codes and "codes" in spec):
            raise ValueError(f"DNSBL {zone}: codes must be a non-empty list of addresses "
                             f"or ranges like \"127.0.0.2-127.0.0.11\", not {codes!r}")
        return cls(zone, tuple(_parse_range(zone, code) for code in codes))

    def counts(self, address: ipaddress.IPv4Address) -> bool:
        """Whether this A record (not a refusal) is a listing here."""
        if not self.codes:
            return address in _LOOPBACK
        return any(low <= int(address) <= high for low, high in self.codes)


def _parse_zone(zone: object) -> str:
    if not isinstance(zone, str):
        raise ValueError(f"DNSBL zone must be a string, not {zone!r}")
    name = zone.strip().lower().removesuffix(".")
    if not name or len(name) > _MAX_ZONE or not all(
            _LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"DNSBL zone {zone!r} is not a DNS name (ASCII letters, digits and "
                         f"hyphens in dot-separated labels, at most {_MAX_ZONE} characters)")
    return name


def _parse_range(zone: str, code: object) -> tuple[int, int]:
    if not isinstance(code, str):
        raise ValueError(f"DNSBL {zone}: code {code!r} is not a string")
    low_text, dash, high_text = code.partition("-")
    try:
        low = ipaddress.IPv4Address(low_text.strip())
        high = ipaddress.IPv4Address(high_text.strip()) if dash else low
    except ValueError:
        raise ValueError(f"DNSBL {zone}: code {code!r} is not an IPv4 address or a range "
                         "like \"127.0.0.2-127.0.0.11\"") from None
    if low > high:
        raise ValueError(f"DNSBL {zone}: code range {code!r} runs backwards")
    if low not in _LOOPBACK or high not in _LOOPBACK:
        raise ValueError(f"DNSBL {zone}: code {code!r} is outside 127.0.0.0/8, where DNSBLs "
                         "answer (RFC 5782 2.1)")
    return int(low), int(high)


class Listing(enum.Enum):
    LISTED = "listed"
    NOT_LISTED = "not_listed"
    ERROR = "error"  # the zone could not say: timeout, failure, refusal


@dataclass(frozen=True, slots=True)
class DnsblAnswer:
    zone: str
    listing: Listing
    codes: tuple[str, ...] = ()  # the A records returned, as text
    reason: str = ""  # for logs: "timeout", "127.255.255.254: query refused by the zone", ...


def query_name(ip: str, zone: str) -> str:
    """The name to look up: IPv4 octets or IPv6 nibbles reversed, then the zone.

    RFC 5782 2.1 and 2.4. An IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4
    client) is looked up as the IPv4 address it is. Raises ValueError if ip is no address.
    """
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    reverse = address.reverse_pointer.rsplit(".", 2)[0]  # less ".in-addr.arpa"/".ip6.arpa"
    return f"{reverse}.{zone}"


@dataclass(frozen=True, slots=True)
class _Reply:
    """What the zone said about an address, before a DnsblZone's codes judge it."""

    records: tuple[ipaddress.IPv4Address, ...] = ()
    error: str = ""  # why the zone could not answer; "" when it did (NXDOMAIN included)


def _judge(zone: DnsblZone, reply: _Reply) -> DnsblAnswer:
    codes = tuple(str(r) for r in reply.records)
    if reply.error:
        return DnsblAnswer(zone.zone, Listing.ERROR, codes, reply.error)
    refusal = next((r for r in reply.records if r in _REFUSALS), None)
    if refusal is not None:
        meaning = _REFUSAL_MEANINGS.get(int(refusal) & 0xFF, "error answer from the zone")
        return DnsblAnswer(zone.zone, Listing.ERROR, codes, f"{refusal}: {meaning}")
    stray = next((r for r in reply.records if r not in _LOOPBACK), None)
    if stray is not None:
        return DnsblAnswer(zone.zone, Listing.ERROR, codes,
                           f"{stray}: not a DNSBL answer (outside 127.0.0.0/8)")
    listed = any(zone.counts(r) for r in reply.records)
    return DnsblAnswer(zone.zone, Listing.LISTED if listed else Listing.NOT_LISTED, codes)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        # dnspython's text: "All nameservers failed to answer the query <q>: Server ... answered
        # REFUSED; ..."; the part after the query names each server and what it said
        said = str(exc).partition(": ")[2]
        return f"no nameserver answered ({said})" if said else "no nameserver answered"
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return "no nameservers configured"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Dnsbl:
    """DNSBL lookups of client addresses on the shared resolver, deduplicated and cached.

    One query per (address, zone name) is in flight at a time, whatever codes the rules judge
    its answer by. Answers are kept for their DNS TTL (NXDOMAIN: the zone's negative TTL),
    failures for ERROR_TTL at most; the cache is bounded, the least recently used going first.
    """

    def __init__(self, resolver: dns.asyncresolver.Resolver, max_entries: int = 10_000,
                 error_ttl: float = ERROR_TTL) -> None:
        self.resolver = resolver
        self.max_entries = max_entries
        self.error_ttl = error_ttl
        # (ip, zone) -> (expiry on the loop's clock, the lookup); in flight: expiry is inf
        self._entries: OrderedDict[
            tuple[str, str], tuple[float, asyncio.Future[tuple[_Reply, float]]]] = OrderedDict()
        # the loop holds tasks weakly: this keeps one evicted from the cache running to its end
        self._running: set[asyncio.Future[tuple[_Reply, float]]] = set()

    def lookup(self, ip: str, zone: DnsblZone) -> asyncio.Future[DnsblAnswer]:
        """Start looking ip up in zone now; the future never raises, failures are ERRORs.

        Each caller gets its own future: cancelling it leaves the shared lookup running.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[DnsblAnswer] = loop.create_future()
        try:
            name = dns.name.from_text(query_name(ip, zone.zone))  # absolute: no search list
        except (ValueError, dns.exception.DNSException) as exc:
            answer.set_result(DnsblAnswer(zone.zone, Listing.ERROR, reason=str(exc)))
            return answer
        shared = self._shared(loop, (ip, zone.zone), name)

        def settle(done: asyncio.Future[tuple[_Reply, float]]) -> None:
            if answer.done():  # the caller cancelled it
                return
            reply = _Reply(error="cancelled") if done.cancelled() else done.result()[0]
            answer.set_result(_judge(zone, reply))

        if shared.done():
            settle(shared)
        else:
            shared.add_done_callback(settle)
        return answer

    def _shared(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str],
                name: dns.name.Name) -> asyncio.Future[tuple[_Reply, float]]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > loop.time():
            self._entries.move_to_end(key)
            return entry[1]
        future = asyncio.ensure_future(self._query(name))
        self._entries[key] = (float("inf"), future)
        self._running.add(future)
        future.add_done_callback(lambda f: self._settled(key, f))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return future

    def _settled(self, key: tuple[str, str],
                 future: asyncio.Future[tuple[_Reply, float]]) -> None:
        self._running.discard(future)
        entry = self._entries.get(key)
        if entry is None or entry[1] is not future:
            return  # evicted or replaced meanwhile
        ttl = 0.0 if future.cancelled() else future.result()[1]
        if ttl > 0:
            self._entries[key] = (asyncio.get_running_loop().time() + ttl, future)
        else:
            del self._entries[key]

    async def _query(self, name: dns.name.Name) -> tuple[_Reply, float]:
        """(reply, seconds to keep it); never raises but for cancellation."""
        try:
            result = await self.resolver.resolve(name, "A", raise_on_no_answer=False)
            # time.time(): dnspython's clock for expirations, which it counts from when the
            # answer arrived, so an answer out of its cache is kept for what is left of its TTL
            ttl = result.expiration - time.time()
            # NODATA (the name exists, without an A record) has no rrset: not listed
            records = tuple(ipaddress.IPv4Address(r.address) for r in result.rrset or ())
        except dns.resolver.NXDOMAIN as exc:
            return _Reply(), self._negative_ttl(name, exc)
        except Exception as exc:  # a DNSBL failure is an answer to judge, never a crash
            return _Reply(error=_failure(exc)), self.error_ttl
        if any(r in _REFUSALS or r not in _LOOPBACK for r in records):
            ttl = min(ttl, self.error_ttl)  # an error answer: kept no longer than a failure
        return _Reply(records=records), ttl

    def _negative_ttl(self, name: dns.name.Name, exc: dns.resolver.NXDOMAIN) -> float:
        cache = self.resolver.cache
        # dnspython cached the NXDOMAIN under ANY, just now or earlier: what is left of it
        cached = cache.get((name, dns.rdatatype.ANY, dns.rdataclass.IN)) if cache else None
        if cached is not None:
            return float(cached.expiration - time.time())
        response = exc.kwargs.get("responses", {}).get(name)
        if isinstance(response, dns.message.QueryMessage):
            return float(response.resolve_chaining().minimum_ttl)
        return NEGATIVE_TTL
