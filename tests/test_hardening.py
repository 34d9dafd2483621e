"""Regression tests for what attacking the core found (one per defect), and the path grammar at
the session: each would fail on the commit before the message pipeline."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from support.dns import DnsServer
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.scripted import DEFAULT_EXTENSIONS, ScriptedDownstream
from support.smtpclient import RawSMTP, data_payload
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]
XCLIENT = "XCLIENT NAME ADDR PROTO HELO PORT"


def _message(subject: str) -> bytes:
    return f"Subject: {subject}\r\n\r\nhello\r\n".encode()


# ---------------------------------------------------------------------- parameters


@pytest.mark.parametrize("value", ["\u00b2", "\uff11\uff12", "\u0663"])
def test_unicode_digits_in_size_refused_not_crashing(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, value: str
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("h.test")
        reply = client.cmd(f"MAIL FROM:<a@example.org> SIZE={value}")
        assert (reply.code, reply.enhanced) == (501, "5.5.4"), reply
        assert client.cmd("MAIL FROM:<a@example.org> SIZE=10").code == 250  # still in session
        client.cmd("QUIT")
    assert "Internal error" not in proxy.log_text()


# ---------------------------------------------------------------------- bare LF commands


def test_bare_lf_command_refused(scripted: ScriptedFactory, proxy_factory: ProxyFactory) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.send(b"EHLO bare.test\n")
        reply = client.read_reply()
        assert (reply.code, reply.enhanced) == (500, "5.5.2"), reply
        assert "Bare LF" in reply.text
        assert client.cmd("EHLO crlf.test").code == 250
        client.cmd("QUIT")


def test_bare_lf_command_accepted_in_normalize_mode(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port, server={"bare_newline": "normalize"}))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.send(b"EHLO bare.test\n")
        assert client.read_reply().code == 250
        client.cmd("QUIT")


# ---------------------------------------------------------------------- HELO length


def test_helo_over_255_octets_refused_and_255_accepted(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port))
    at_limit = ("a" * 63 + ".") * 3 + "b" * 63  # 255 octets
    assert len(at_limit) == 255
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        over = client.cmd(f"EHLO {at_limit}x")
        assert (over.code, over.enhanced) == (501, "5.5.4"), over
        assert client.cmd(f"HELO {'é' * 128}").code == 501  # 256 octets in UTF-8
        assert client.cmd(f"EHLO {at_limit}").code == 250
        client.cmd("QUIT")


# ---------------------------------------------------------------------- XCLIENT fails closed


def test_refused_xclient_never_delivers_under_the_proxy_identity(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted({"XCLIENT": "550 5.7.0 Insufficient authorization"},
                      extensions=[*DEFAULT_EXTENSIONS, XCLIENT])
    proxy = proxy_factory(base_config(server.port))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("h.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        reply = client.cmd("RCPT TO:<alice@relay.test>")
        assert (reply.code, reply.enhanced) == (451, "4.7.0"), reply
        again = client.cmd("RCPT TO:<bob@relay.test>")
        assert (again.code, again.enhanced) == (451, "4.7.0"), again
        assert client.cmd("DATA").code == 554
        client.cmd("QUIT")
    assert not any(c.startswith(("MAIL", "RCPT")) for c in server.all_commands), (
        server.all_commands)
    assert server.messages == []


@pytest.fixture(scope="module")
def strict_helo_postfix() -> Iterator[PostfixInstance]:
    """A Postfix that refuses invalid HELO names at the HELO command itself."""
    instance = PostfixInstance(extra_settings={
        "smtpd_delay_reject": "no",
        "smtpd_helo_required": "yes",
        "smtpd_helo_restrictions": "reject_invalid_helo_hostname",
    })
    instance.start()
    yield instance
    instance.stop()


def test_postfix_refusing_the_client_helo_is_the_client_problem_only(
    strict_helo_postfix: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    pf = strict_helo_postfix
    proxy = proxy_factory(base_config(pf.port, downstream={"down_time": 300}))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("bad_name!.test")  # the proxy takes it; this Postfix does not
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        refused = client.cmd("RCPT TO:<alice@relay.test>")
        assert refused.code == 501, refused  # Postfix's own words, relayed
        assert "Helo command rejected" in refused.text, refused
        client.cmd("QUIT")
    # the server was not marked down: a client with a good name is served at once
    subject = uuid.uuid4().hex
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("good.client.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message(subject)))
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    delivered = pf.wait_for_deliveries(1, user="alice")
    assert any(subject.encode() in m for m in delivered)


# ---------------------------------------------------------------------- paths


@pytest.mark.parametrize("address", [
    '"john doe"@relay.test',
    '"odd\\"quote"@relay.test',
    "first.last+tag@relay.test",
])
def test_valid_paths_forwarded_verbatim(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, address: str
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("h.test")
        assert client.cmd("MAIL FROM:<@hop.example:a@example.org>").code == 250
        assert client.cmd(f"RCPT TO:<{address}>").code == 250
        client.cmd("QUIT")
    server.wait_for_command("RCPT")
    assert f"RCPT TO:<{address}>" in server.all_commands
    assert "MAIL FROM:<a@example.org>" in server.all_commands  # the source route is dropped


@pytest.mark.parametrize("argument, code", [
    ("TO:<a..b@relay.test>", "5.1.3"),
    ("TO:<a@relay..test>", "5.1.3"),
    ("TO:<" + "l" * 65 + "@relay.test>", "5.1.3"),
    ("TO:<a@[300.1.1.1]>", "5.1.3"),
    ("TO:<a@-relay.test>", "5.1.3"),
    ("TO:<a@relay.test> junk", "5.5.4"),
    ("TO:<\"unterminated@relay.test>", "5.1.3"),
    ("TO:<>", "5.1.3"),
])
def test_invalid_paths_refused_before_any_decision(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, argument: str, code: str
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("h.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        reply = client.cmd(f"RCPT {argument}")
        assert reply.code // 100 == 5 and reply.enhanced == code, reply
        client.cmd("QUIT")
    assert server.connections == 0, server.describe()


def test_utf8_address_needs_smtputf8_and_idna_domains_are_matched(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port, server={
        "accept_domains": ["xn--bcher-kva.example"]}))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("h.test")
        without = client.cmd("MAIL FROM:<jörg@example.org>")
        assert (without.code, without.enhanced) == (501, "5.1.7"), without
        assert client.cmd("MAIL FROM:<jörg@example.org> SMTPUTF8").code == 250
        assert client.cmd("RCPT TO:<leser@bücher.example>").code == 250
        assert client.cmd("RCPT TO:<leser@xn--bcher-kva.example>").code == 250
        assert client.cmd("RCPT TO:<leser@bucher.example>").code == 550
        client.cmd("QUIT")


# ---------------------------------------------------------------------- reverse DNS


def test_reverse_dns_starts_at_connect_and_is_cached_per_address(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory,
    dns_server: Callable[..., DnsServer],
) -> None:
    dns = dns_server(ptr={"127.0.0.1": "mx.client.test"}, a={"mx.client.test": "127.0.0.1"})
    server = scripted()
    proxy = proxy_factory(base_config(server.port, server={"reverse_dns": True},
                                      dns={"nameservers": [dns.nameserver]}))
    ptr = "query[PTR] 1.0.0.127.in-addr.arpa"
    # the readiness probe's connection already asked: at connect, before any command
    wait_until(lambda: ptr in dns.log_text(), "the PTR query of the first connection", 10)
    for _ in range(5):
        with RawSMTP() as client:
            client.connect(proxy.host, proxy.port)
            client.ehlo("h.test")
            assert client.cmd("MAIL FROM:<a@example.org>").code == 250
            assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
            client.cmd("QUIT")
    assert dns.log_text().count(ptr) == 1, dns.log_text()
    xclient_free = [c for c in server.all_commands if c.startswith("MAIL")]
    assert len(xclient_free) == 5
