"""SPF (relayproxy.auth.spf): pyspf fed by the async resolver, against the tests' own zones on
a loopback dnsmasq: include, redirect, macros, the void-lookup and 10-lookup limits, DNS
failures. Every lookup is bounded: a hang fails the test instead of blocking it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from support.dns import DnsServer

from relayproxy.auth.spf import SPFResult, check
from relayproxy.config import DNSConfig, HostPort
from relayproxy.dns import make_resolver

CLIENT = "192.0.2.10"
TXT = {
    "pass.test": "v=spf1 ip4:192.0.2.0/24 -all",
    "fail.test": "v=spf1 ip4:198.51.100.1 -all",
    "soft.test": "v=spf1 ~all",
    "neutral.test": "v=spf1 ?all",
    "include.test": "v=spf1 include:pass.test -all",
    "include-fail.test": "v=spf1 include:fail.test -all",
    "redirect.test": "v=spf1 redirect=pass.test",
    "redirect-fail.test": "v=spf1 redirect=fail.test",
    "macro.test": "v=spf1 exists:%{i}.%{l}.allow.macro.test -all",
    "a.test": "v=spf1 a:host.a.test -all",
    "mx.test": "v=spf1 mx -all",
    "mx-elsewhere.test": "v=spf1 mx -all",
    "mx-named.test": "v=spf1 mx:mx.test -all",
    "mx-deny.test": "v=spf1 -mx:mx.test +all",
    "exp.test": "v=spf1 -all exp=why.exp.test",
    "why.exp.test": "%{d} does not send from %{i}",
    "void.test": "v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all",
    "toomany.test": "v=spf1 " + " ".join(f"include:l{i}.many.test" for i in range(11))
    + " -all",
    "broken.test": "v=spf1 ip4:not-an-address -all",
    "two.test": ["v=spf1 -all", "v=spf1 +all"],
    "helo.test": "v=spf1 ip4:192.0.2.0/24 -all",
    "include-timeout.test": "v=spf1 include:x.timeout.test -all",
    "xn--bcher-kva.test": "v=spf1 ip4:192.0.2.0/24 -all",
    **{f"l{i}.many.test": "v=spf1 -ip4:203.0.113.1" for i in range(11)},
}
A = {"192.0.2.10.bob.allow.macro.test": "127.0.0.2", "host.a.test": CLIENT,
     "mail.mx.test": CLIENT, "mail.mx-elsewhere.test": "198.51.100.25"}
MX = {"mx.test": "mail.mx.test", "mx-elsewhere.test": "mail.mx-elsewhere.test"}


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = DnsServer(workdir=tmp_path_factory.mktemp("spf-dns"), txt=TXT, a=A, mx=MX,
                       refused=["timeout.test"])
    server.start()
    yield server
    server.stop()


def spf(zone: DnsServer | HostPort, sender: str, helo: str = "client.test",
        timeout: float = 5.0) -> SPFResult:
    where = zone if isinstance(zone, HostPort) else HostPort(zone.host, zone.port)
    resolver = make_resolver(DNSConfig(nameservers=(where,), timeout=1.0))

    async def run() -> SPFResult:
        return await check(resolver, CLIENT, sender, helo, "mx.test", timeout)

    return asyncio.run(asyncio.wait_for(run(), timeout + 5))


@pytest.mark.parametrize(("sender", "result"), [
    ("a@pass.test", "pass"),
    ("a@fail.test", "fail"),
    ("a@soft.test", "softfail"),
    ("a@neutral.test", "neutral"),
    ("a@nothing.test", "none"),
    ("a@include.test", "pass"),
    ("a@include-fail.test", "fail"),  # include's fail is no match: then -all
    ("a@redirect.test", "pass"),
    ("a@redirect-fail.test", "fail"),
    ("bob@macro.test", "pass"),  # %{i} and %{l} expanded
    ("eve@macro.test", "fail"),
    ("a@a.test", "pass"),
    ("a@mx.test", "pass"),  # the client is the domain's mail exchanger
    ("a@mx-elsewhere.test", "fail"),  # its exchanger has another address
    ("a@mx-named.test", "pass"),  # mx:domain
    ("a@mx-deny.test", "fail"),  # -mx:domain matches the client
    ("a@void.test", "permerror"),  # a third void lookup (RFC 7208 4.6.4)
    ("a@toomany.test", "permerror"),  # an 11th DNS mechanism (RFC 7208 4.6.4)
    ("a@broken.test", "permerror"),
    ("a@two.test", "permerror"),  # two records (RFC 7208 4.5)
    ("a@timeout.test", "temperror"),
    ("a@include-timeout.test", "temperror"),
])
def test_results(zone: DnsServer, sender: str, result: str) -> None:
    found = spf(zone, sender)
    assert found.result == result, found
    assert found.identity == "mailfrom" and found.domain == sender.split("@")[1]


def test_mx_mechanism_looks_up_each_exchangers_address(zone: DnsServer) -> None:
    """A fail of mx-elsewhere.test is its exchanger's other address, not a missing MX."""
    before = zone.queries("mail.mx-elsewhere.test", "A")
    assert spf(zone, "b@mx-elsewhere.test").result == "fail"
    assert zone.queries("mail.mx-elsewhere.test", "A") == before + 1


def test_explanation_of_a_fail_is_the_domains(zone: DnsServer) -> None:
    found = spf(zone, "a@exp.test")
    assert found.result == "fail"
    assert found.explanation == f"exp.test does not send from {CLIENT}"


def test_null_sender_checks_the_helo_name(zone: DnsServer) -> None:
    found = spf(zone, "", helo="helo.test")
    assert (found.result, found.identity, found.domain) == ("pass", "helo", "helo.test")


def test_a_nameserver_that_never_answers_gives_temperror_within_the_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        found = spf(HostPort("127.0.0.1", silent.getsockname()[1]), "a@pass.test",
                    timeout=2.0)
    assert found.result == "temperror"


def test_cached_answers_need_no_query(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a TTL, the second check is answered from the resolver's cache."""
    server = DnsServer(workdir=tmp_path_factory.mktemp("spf-ttl"), txt=TXT, ttl=300).start()
    try:
        resolver = make_resolver(DNSConfig(nameservers=(HostPort(server.host, server.port),),
                                           timeout=1.0))

        async def twice() -> list[SPFResult]:
            return [await check(resolver, CLIENT, "a@include.test", "h.test", "mx", 5)
                    for _ in range(2)]

        results = asyncio.run(asyncio.wait_for(twice(), 10))
        assert [r.result for r in results] == ["pass", "pass"]
        assert server.queries("include.test", "TXT") == 1
        assert server.queries("pass.test", "TXT") == 1
    finally:
        server.stop()


def test_results_last_no_longer_than_their_answers(zone: DnsServer) -> None:
    """The module zone has TTL 0: nothing is cached, each check asks again; a temperror is
    never kept either."""
    before = zone.queries("redirect.test", "TXT")
    assert spf(zone, "x@redirect.test").result == "pass"
    assert spf(zone, "x@redirect.test").result == "pass"
    assert zone.queries("redirect.test", "TXT") == before + 2
    assert spf(zone, "x@timeout.test").result == "temperror"
    assert spf(zone, "x@timeout.test").result == "temperror"
    assert zone.queries("timeout.test", "TXT") >= 2


def test_address_literals_have_no_spf_and_idn_domains_are_looked_up_as_a_labels(
        zone: DnsServer) -> None:
    assert spf(zone, "a@[192.0.2.10]").result == "none"
    assert spf(zone, "", helo="[192.0.2.10]").result == "none"
    found = spf(zone, "a@bücher.test")
    assert (found.result, found.domain) == ("pass", "xn--bcher-kva.test")
