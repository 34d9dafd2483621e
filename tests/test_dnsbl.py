"""DNSBL lookups and the shared resolver cache, against a real DNS server (dnsmasq) on loopback.

Every lookup runs under both event loops the proxy can run on. Whether a query reached the
server is read from dnsmasq's query log, which it writes before it answers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar, cast

import dns.asyncresolver
import dns.message
import dns.query
import pytest
import uvloop
from support.dns import DnsServer
from support.ports import LOOPBACK

from relayproxy.config import DNSConfig, HostPort
from relayproxy.dns import UNAVAILABLE, client_name, make_resolver
from relayproxy.policy.dnsbl import Dnsbl, DnsblAnswer, DnsblZone, Listing, query_name

T = TypeVar("T")
BOUND = 5.0  # seconds any lookup here may take at most: a hang fails, it does not block
ZONE = DnsblZone.parse("bl.test")
V6 = "2001:db8::1"
V6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"
RECORDS = {
    "2.0.0.127.bl.test": "127.0.0.2",  # RFC 5782 5: the test address that is always listed
    "1.2.0.192.bl.test": "127.0.0.10",
    "2.2.0.192.bl.test": "127.255.255.254",
    "3.2.0.192.bl.test": "203.0.113.7",  # what an NXDOMAIN-rewriting resolver makes up
    V6_NAME: "127.0.0.2",
}


class Run(Protocol):
    def __call__(self, coro: Coroutine[Any, Any, T]) -> T: ...


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        def run_bounded(coro: Coroutine[Any, Any, T]) -> T:
            return runner.run(asyncio.wait_for(coro, BOUND))
        yield run_bounded


def resolver_for(host: str, port: int, timeout: float = 2.0) -> dns.asyncresolver.Resolver:
    return make_resolver(DNSConfig(nameservers=(HostPort(host, port),), timeout=timeout))


@pytest.fixture
def zone_server(dns_server: Callable[..., DnsServer]) -> DnsServer:
    return dns_server(a=RECORDS, txt={"4.2.0.192.bl.test": "no A record here"}, ttl=60)


@pytest.fixture
def dnsbl(zone_server: DnsServer) -> Dnsbl:
    return Dnsbl(resolver_for(zone_server.host, zone_server.port))


async def lookup(dnsbl: Dnsbl, ip: str, zone: DnsblZone = ZONE) -> DnsblAnswer:
    return await dnsbl.lookup(ip, zone)


# ------------------------------------------------------------------------- query names

def test_query_names_reverse_octets_and_nibbles() -> None:
    assert query_name("192.0.2.1", "bl.test") == "1.2.0.192.bl.test"
    assert query_name(V6, "bl.test") == V6_NAME
    assert query_name("::ffff:192.0.2.1", "bl.test") == "1.2.0.192.bl.test"
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        query_name("192.0.2", "bl.test")


# ------------------------------------------------------------------------- answers

def test_listed_address(run: Run, dnsbl: Dnsbl) -> None:
    assert run(lookup(dnsbl, "127.0.0.2")) == DnsblAnswer("bl.test", Listing.LISTED, ("127.0.0.2",))


def test_code_outside_codes_is_not_listed(
        run: Run, dnsbl: Dnsbl, zone_server: DnsServer) -> None:
    narrow = DnsblZone.parse({"zone": "bl.test", "codes": ["127.0.0.2-127.0.0.3", "127.0.0.4"]})

    async def both() -> list[DnsblAnswer]:
        return list(await asyncio.gather(dnsbl.lookup("192.0.2.1", narrow),
                                         dnsbl.lookup("192.0.2.1", ZONE)))

    assert run(both()) == [DnsblAnswer("bl.test", Listing.NOT_LISTED, ("127.0.0.10",)),
                           DnsblAnswer("bl.test", Listing.LISTED, ("127.0.0.10",))]
    # one query answered both: the codes judge the answer, they do not change the question
    assert zone_server.queries("1.2.0.192.bl.test") == 1


@pytest.mark.parametrize("codes", [[], ["127.0.0.0-127.255.255.255"]])
def test_refusal_answer_is_an_error_never_a_listing(
        run: Run, dnsbl: Dnsbl, codes: list[str]) -> None:
    zone = DnsblZone.parse({"zone": "bl.test", "codes": codes} if codes else "bl.test")
    assert run(lookup(dnsbl, "192.0.2.2", zone)) == DnsblAnswer(
        "bl.test", Listing.ERROR, ("127.255.255.254",),
        "127.255.255.254: query refused by the zone")


def test_answer_outside_loopback_is_an_error(run: Run, dnsbl: Dnsbl) -> None:
    answer = run(lookup(dnsbl, "192.0.2.3"))
    assert (answer.listing, answer.codes) == (Listing.ERROR, ("203.0.113.7",))
    assert "outside 127.0.0.0/8" in answer.reason


def test_nxdomain_and_nodata_are_not_listed(run: Run, dnsbl: Dnsbl) -> None:
    assert run(lookup(dnsbl, "192.0.2.99")) == DnsblAnswer("bl.test", Listing.NOT_LISTED)
    assert run(lookup(dnsbl, "192.0.2.4")) == DnsblAnswer("bl.test", Listing.NOT_LISTED)


def test_ipv6_address_is_queried_by_nibbles(
        run: Run, dnsbl: Dnsbl, zone_server: DnsServer) -> None:
    assert run(lookup(dnsbl, V6)).listing is Listing.LISTED
    assert zone_server.queries(V6_NAME) == 1


def test_no_address_is_an_error_not_an_exception(run: Run, dnsbl: Dnsbl) -> None:
    answer = run(lookup(dnsbl, "not-an-ip"))
    assert answer.listing is Listing.ERROR
    assert "not-an-ip" in answer.reason


# ------------------------------------------------------------------------- concurrency

class Gate(asyncio.DatagramProtocol):
    """A nameserver that holds every query until `expected` are waiting, then has dnsmasq
    answer them all: the lookups complete only if they were all in flight at once."""

    def __init__(self, upstream: DnsServer, expected: int) -> None:
        self.upstream = upstream
        self.expected = expected
        self.held: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.held.append((data, addr))
        if len(self.held) < self.expected:
            return
        assert self.transport is not None
        for query, client in self.held:
            reply = dns.query.udp(dns.message.from_wire(query), self.upstream.host,
                                  port=self.upstream.port, timeout=2)
            self.transport.sendto(reply.to_wire(), client)


def test_zones_are_looked_up_concurrently(
        run: Run, dns_server: Callable[..., DnsServer]) -> None:
    zones = [DnsblZone.parse(z) for z in ("one.test", "two.test", "three.test")]
    upstream = dns_server(a={"5.2.0.192.one.test": "127.0.0.2", "5.2.0.192.three.test":
                             "127.0.0.3"})

    async def all_zones() -> list[DnsblAnswer]:
        loop = asyncio.get_running_loop()
        transport, gate = await loop.create_datagram_endpoint(
            lambda: Gate(upstream, len(zones)), local_addr=(LOOPBACK, 0))
        try:
            dnsbl = Dnsbl(resolver_for(LOOPBACK, transport.get_extra_info("sockname")[1]))
            started = [dnsbl.lookup("192.0.2.5", zone) for zone in zones]  # as at connect
            answers = list(await asyncio.gather(*started))
            assert len(gate.held) == len(zones)  # each zone asked once, all before any answer
            return answers
        finally:
            transport.close()

    assert [(a.zone, a.listing) for a in run(all_zones())] == [
        ("one.test", Listing.LISTED), ("two.test", Listing.NOT_LISTED),
        ("three.test", Listing.LISTED)]


def test_concurrent_lookups_share_one_query(
        run: Run, dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server(a=RECORDS)  # TTL 0: only the sharing of the lookup in flight saves
    dnsbl = Dnsbl(resolver_for(server.host, server.port))

    async def twice() -> list[DnsblAnswer]:
        first, second = dnsbl.lookup("127.0.0.2", ZONE), dnsbl.lookup("127.0.0.2", ZONE)
        first.cancel()  # one caller giving up leaves the other's lookup running
        return [await second]

    assert [a.listing for a in run(twice())] == [Listing.LISTED]
    assert server.queries("2.0.0.127.bl.test") == 1


# ------------------------------------------------------------------------- cache

def test_answers_are_cached_for_their_ttl(
        run: Run, dnsbl: Dnsbl, zone_server: DnsServer) -> None:
    for ip in ("127.0.0.2", "192.0.2.99"):  # a listing, and NXDOMAIN (negative TTL: 300 s)
        first = run(lookup(dnsbl, ip))
        assert run(lookup(dnsbl, ip)) == first
    assert zone_server.queries("2.0.0.127.bl.test") == 1
    assert zone_server.queries("99.2.0.192.bl.test") == 1


def test_zero_ttl_answers_are_not_kept(run: Run, dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server(a=RECORDS)  # dnsmasq's default TTL, 0
    dnsbl = Dnsbl(resolver_for(server.host, server.port))
    run(lookup(dnsbl, "127.0.0.2"))
    run(lookup(dnsbl, "127.0.0.2"))
    assert server.queries("2.0.0.127.bl.test") == 2


def test_error_answers_are_kept_no_longer_than_failures(run: Run, zone_server: DnsServer) -> None:
    resolver = resolver_for(zone_server.host, zone_server.port)
    resolver.cache = None  # so that dnsmasq sees every lookup Dnsbl does not answer itself
    dnsbl = Dnsbl(resolver, error_ttl=0)
    for ip in ("192.0.2.2", "192.0.2.2", "127.0.0.2", "127.0.0.2"):
        run(lookup(dnsbl, ip))
    assert zone_server.queries("2.2.0.192.bl.test") == 2  # the refusal, TTL 60 s, was not kept
    assert zone_server.queries("2.0.0.127.bl.test") == 1  # the listing was


def test_cache_is_bounded(run: Run, zone_server: DnsServer) -> None:
    resolver = resolver_for(zone_server.host, zone_server.port)
    resolver.cache = None  # so that dnsmasq sees every lookup Dnsbl does not answer itself
    dnsbl = Dnsbl(resolver, max_entries=2)
    for ip in ("127.0.0.2", "192.0.2.1", "192.0.2.99", "127.0.0.2", "192.0.2.99"):
        run(lookup(dnsbl, ip))
    # the third lookup evicted the first, the least recently used
    assert zone_server.queries("2.0.0.127.bl.test") == 2
    assert zone_server.queries("99.2.0.192.bl.test") == 1


def test_resolver_cache_serves_repeat_lookups_within_the_ttl(
        run: Run, dns_server: Callable[..., DnsServer]) -> None:
    records = {"ptr": {"127.0.0.9": "mx.client.test"}, "a": {"mx.client.test": "127.0.0.9"}}
    for ttl, expected in ((60, 1), (0, 2)):
        server = dns_server(**records, ttl=ttl)
        resolver = resolver_for(server.host, server.port)
        for _ in range(2):
            assert run(client_name(resolver, "127.0.0.9")) == ("mx.client.test", "mx.client.test")
        assert server.queries("9.0.0.127.in-addr.arpa", "PTR") == expected, ttl
        assert server.queries("mx.client.test", "A") == expected, ttl
    # negative answers too: the second NXDOMAIN comes out of the cache
    for _ in range(2):
        assert run(client_name(resolver, "127.0.0.8")) == (UNAVAILABLE, "")
    assert server.queries("8.0.0.127.in-addr.arpa", "PTR") == 1


# ------------------------------------------------------------------------- failures

@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port on loopback where queries arrive and are never answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield sock.getsockname()[1]


def test_silent_nameserver_is_a_timeout_error(run: Run, silent_port: int) -> None:
    dnsbl = Dnsbl(resolver_for(LOOPBACK, silent_port, timeout=0.3))
    assert run(lookup(dnsbl, "127.0.0.2")) == DnsblAnswer("bl.test", Listing.ERROR,
                                                          reason="timeout")

    async def again() -> bool:
        return dnsbl.lookup("127.0.0.2", ZONE).done()

    assert run(again()), "the failure is kept briefly: a dead zone costs one timeout, not each"


def test_unused_port_is_an_error(run: Run) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there now
    answer = run(lookup(Dnsbl(resolver_for(LOOPBACK, port, timeout=0.3)), "127.0.0.2"))
    assert answer.listing is Listing.ERROR
    assert answer.reason == "timeout" or "Connection refused" in answer.reason, answer


def test_refusing_nameserver_is_an_error(run: Run, dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server(refused=["bl.test"])
    answer = run(lookup(Dnsbl(resolver_for(server.host, server.port)), "127.0.0.2"))
    assert answer.listing is Listing.ERROR
    assert "REFUSED" in answer.reason and answer.reason.startswith("no nameserver answered")


# ------------------------------------------------------------------------- configuration

def test_zone_specs_parse() -> None:
    assert DnsblZone.parse(" Zen.Spamhaus.ORG. ") == DnsblZone("zen.spamhaus.org")
    assert DnsblZone.parse({"zone": "zen.spamhaus.org",
                            "codes": ["127.0.0.2-127.0.0.11", "127.0.0.4"]}) == DnsblZone(
        "zen.spamhaus.org", ((0x7F000002, 0x7F00000B), (0x7F000004, 0x7F000004)))
    assert DnsblZone.parse({"zone": "bl.test"}) == DnsblZone("bl.test")


@pytest.mark.parametrize(("spec", "message"), [
    ("", "is not a DNS name"),
    ("bl..test", "is not a DNS name"),
    ("bl test", "is not a DNS name"),
    ("-bl.test", "is not a DNS name"),
    ("x" * 64 + ".test", "is not a DNS name"),
    ("a." * 95 + "test", "at most 189 characters"),
    ("blöck.test", "is not a DNS name"),
    (42, "must be a zone name or a table"),
    ({"zone": 42}, "zone must be a string"),
    ({"codes": ["127.0.0.2"]}, "zone is missing"),
    ({"zone": "bl.test", "code": ["127.0.0.2"]}, "unknown key(s) code"),
    ({"zone": "bl.test", "codes": "127.0.0.2"}, "codes must be a non-empty list"),
    ({"zone": "bl.test", "codes": []}, "codes must be a non-empty list"),
    ({"zone": "bl.test", "codes": [2]}, "code 2 is not a string"),
    ({"zone": "bl.test", "codes": ["127.0.0"]}, "is not an IPv4 address or a range"),
    ({"zone": "bl.test", "codes": ["127.0.0.2-"]}, "is not an IPv4 address or a range"),
    ({"zone": "bl.test", "codes": ["127.0.0.9-127.0.0.2"]}, "runs backwards"),
    ({"zone": "bl.test", "codes": ["10.0.0.2"]}, "outside 127.0.0.0/8"),
])
def test_bad_zone_specs_are_refused_clearly(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DnsblZone.parse(spec)
