"""PROXY protocol v1 and v2 on the listener (server.proxy_protocol), with headers written here:
the address a valid header names is what the downstream hears through XCLIENT (a scripted
downstream, and the real Postfix), what the Received field, the log and the per-address
connection limit use; a missing, malformed, truncated, oversized, late or untrusted header
closes the connection before the banner, counted by kind."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.proxyheader import V2_SIGNATURE, proxied, v1, v2, v2_local, wait_ready
from support.scripted import DEFAULT_EXTENSIONS, ScriptedDownstream
from support.smtpclient import RawSMTP, data_payload
from support.wait import wait_until

from relayproxy.config import ServerConfig
from relayproxy.proxyproto import is_trusted, trusted_networks

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]

XCLIENT_EXTENSIONS = [*DEFAULT_EXTENSIONS, "XCLIENT NAME ADDR PORT PROTO HELO"]
ERRORS = "relayproxy_proxy_protocol_errors_total"


def start(proxy_factory: ProxyFactory, downstream_port: int, **server: Any) -> ProxyProcess:
    """A proxy with proxy_protocol on; ready once a LOCAL header is answered 220."""
    config = base_config(downstream_port, server={"proxy_protocol": True, **server})
    return wait_ready(proxy_factory(config, wait_ready=False))


def deliver(client: RawSMTP, subject: str = "proxied") -> None:
    assert client.read_reply().code == 220
    assert client.ehlo("client.example").code == 250
    assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
    assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
    assert client.cmd("DATA").code == 354
    client.send(data_payload(f"Subject: {subject}\r\n\r\nbody\r\n".encode()))
    assert client.read_reply().code == 250
    client.cmd("QUIT")


def xclient(server: ScriptedDownstream) -> dict[str, str]:
    (command,) = [c for c in server.all_commands if c.upper().startswith("XCLIENT ")]
    return dict(item.split("=", 1) for item in command.split()[1:])


def closed_unanswered(client: RawSMTP) -> bytes:
    """What the proxy sent before closing (it must close within the wait)."""
    sock = client.sock
    assert sock is not None
    received = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received


def counted(proxy: ProxyProcess, kind: str, before: float) -> None:
    wait_until(lambda: proxy.metric(ERRORS, {"kind": kind}) == before + 1,
               f"{ERRORS}{{kind={kind}}} to reach {before + 1}", 10,
               describe=lambda: f"now {proxy.metric(ERRORS, {'kind': kind})}")


@pytest.fixture
def downstream(scripted: ScriptedFactory) -> ScriptedDownstream:
    return scripted(extensions=XCLIENT_EXTENSIONS)


@pytest.mark.parametrize(("header", "addr", "port"), [
    (v1("198.51.100.7", 40001), "198.51.100.7", "40001"),
    (v1("2001:db8::7", 40002), "IPV6:2001:db8::7", "40002"),
    (v2("198.51.100.8", 40003), "198.51.100.8", "40003"),
    (v2("2001:db8::8", 40004), "IPV6:2001:db8::8", "40004"),
    (v2("::ffff:198.51.100.9", 40005), "198.51.100.9", "40005"),  # IPv4-mapped: IPv4
    # TLVs (here a PP2_TYPE_AUTHORITY) are read past
    (v2("198.51.100.10", 40006, tlv=b"\x02\x00\x07mx.test"), "198.51.100.10", "40006"),
], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6", "v2-mapped", "v2-tlv"])
def test_valid_header_gives_the_real_client_address(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream, header: bytes, addr: str,
    port: str,
) -> None:
    proxy = start(proxy_factory, downstream.port)
    with proxied(proxy.host, proxy.port, header) as client:
        deliver(client)
    (message,) = downstream.wait_for_messages(1)
    attributes = xclient(downstream)
    assert (attributes["ADDR"], attributes["PORT"]) == (addr, port), attributes
    ip = addr.removeprefix("IPV6:")
    literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"  # RFC 5321 address literal
    received = message.split(b"\r\n", 1)[0].decode()
    assert received.startswith(f"Received: from client.example (unknown {literal})"), received
    (transaction,) = proxy.wait_for_transactions(1)
    assert transaction["client"] == (f"{ip}:{port}"), transaction


def test_header_split_across_segments(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    proxy = start(proxy_factory, downstream.port)
    header = v2("198.51.100.20", 40100)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port, read_greeting=False)
        sock = client.sock
        assert sock is not None
        # cut inside the signature, the fixed part and the addresses (TCP_NODELAY: one
        # segment each; however they arrive, the header must be read whole)
        for part in (header[:3], header[3:14], header[14:21], header[21:]):
            sock.sendall(part)
        deliver(client)
    downstream.wait_for_messages(1)
    assert xclient(downstream)["ADDR"] == "198.51.100.20"


def test_local_command_keeps_the_connection_address(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    proxy = start(proxy_factory, downstream.port)
    with proxied(proxy.host, proxy.port, v2_local()) as client:
        assert client.sock is not None
        own_port = client.sock.getsockname()[1]
        deliver(client)
    downstream.wait_for_messages(1)
    attributes = xclient(downstream)
    assert (attributes["ADDR"], attributes["PORT"]) == ("127.0.0.1", str(own_port))


def test_real_address_reaches_postfix(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance
) -> None:
    """Postfix's own Received field names the address from the header (via XCLIENT)."""
    proxy = start(proxy_factory, mailboxes.port)
    with proxied(proxy.host, proxy.port, v1("198.51.100.30", 40200)) as client:
        deliver(client, "proxied-to-postfix")
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    postfix_received = [line for line in delivered.decode().split("\r\nReceived: ")
                        if "by postfix.test" in line]
    assert postfix_received and "[198.51.100.30]" in postfix_received[0], delivered[:600]
    assert "127.0.0.1" not in postfix_received[0], postfix_received[0]


# ---------------------------------------------------------------------- refused


def _truncated_v2() -> bytes:
    return v2("198.51.100.40", 40300)[:20]  # the addresses cut off


@pytest.mark.parametrize(("payload", "kind"), [
    (b"EHLO client.example\r\n", "missing"),  # an SMTP client, no header
    (b"", "missing"),  # connected and closed, nothing sent
    (b"PROXY TCP4 198.51.100.1 192.0.2.1 x 25\r\n", "malformed"),
    (b"PROXY TCP4 not-an-address 192.0.2.1 1 25\r\n", "malformed"),
    (b"PROXY TCP4 2001:db8::1 192.0.2.1 1 25\r\n", "malformed"),  # family mismatch
    (b"PROXY TCP4 " + b"1" * 200 + b"\r\n", "malformed"),  # over the 107-octet line
    (V2_SIGNATURE + struct.pack("!BBH", 0x31, 0x11, 12) + bytes(12), "malformed"),  # version 3
    (v2("198.51.100.1", 1)[:13] + b"\x12" + v2("198.51.100.1", 1)[14:], "malformed"),  # UDP
    (b"PROXY TCP4 198.51.100.1 192.0.2.1 1", "truncated"),
    (_truncated_v2(), "truncated"),
], ids=["smtp", "empty", "bad-port", "bad-address", "family", "oversized-v1", "v2-version",
        "v2-udp", "truncated-v1", "truncated-v2"])
def test_bad_header_closes_the_connection(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream, payload: bytes, kind: str
) -> None:
    proxy = start(proxy_factory, downstream.port)
    before = proxy.metric(ERRORS, {"kind": kind})
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port, read_greeting=False)
        assert client.sock is not None
        client.sock.sendall(payload)
        if kind == "truncated" or not payload:
            client.sock.shutdown(socket.SHUT_WR)  # the peer goes away mid-header
        assert closed_unanswered(client) == b""
    counted(proxy, kind, before)
    assert downstream.connections == 0
    assert proxy.metric("relayproxy_sessions_active") == 0


def test_header_from_an_untrusted_peer_is_refused(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    # loopback is not trusted here: even a valid header is refused, unread
    config = base_config(downstream.port, server={
        "proxy_protocol": True, "proxy_trusted": ["192.0.2.0/24"]})
    proxy = proxy_factory(config, wait_ready=False)
    with proxied_when_listening(proxy, v1("198.51.100.50", 40400)) as client:
        assert closed_unanswered(client) == b""
    counted(proxy, "untrusted", 0)
    assert downstream.connections == 0
    assert "PROXY protocol untrusted from 127.0.0.1" in proxy.log_text()


def proxied_when_listening(proxy: ProxyProcess, header: bytes) -> RawSMTP:
    def connects() -> RawSMTP | None:
        if proxy.returncode is not None:
            return None
        try:
            return proxied(proxy.host, proxy.port, header)
        except OSError:
            return None

    return wait_until(connects, "the proxy to listen", 15, describe=proxy.log_tail,
                      abort=lambda: None if proxy.returncode is None else "the proxy exited")


def test_no_header_in_time_closes(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    proxy = start(proxy_factory, downstream.port, proxy_timeout=0.5)
    before = proxy.metric(ERRORS, {"kind": "timeout"})
    with RawSMTP(timeout=20) as client:
        client.connect(proxy.host, proxy.port, read_greeting=False)
        client.send(b"PROXY TCP4 198.51.100.1")  # and then nothing
        assert closed_unanswered(client) == b""
    counted(proxy, "timeout", before)


# ---------------------------------------------------------------------- what uses the address


def test_connection_limit_applies_to_the_real_address(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    """All connections come from 127.0.0.1 (the "load balancer"); the limit counts the
    addresses their headers name."""
    proxy = start(proxy_factory, downstream.port, max_connections_per_ip=1)
    with proxied(proxy.host, proxy.port, v2("198.51.100.60", 1)) as first:
        assert first.read_reply().code == 220
        with proxied(proxy.host, proxy.port, v2("198.51.100.60", 2)) as same:
            refused = same.read_reply()
            assert (refused.code, refused.enhanced) == (421, "4.7.0"), refused
            assert "from your address" in refused.text
        with proxied(proxy.host, proxy.port, v2("198.51.100.61", 3)) as other:
            assert other.read_reply().code == 220
            other.cmd("QUIT")
        first.cmd("QUIT")


def test_header_comes_before_greet_delay(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    """The header is not "talking before the greeting"; a command right behind it is."""
    proxy = start(proxy_factory, downstream.port, greet_delay=0.3)
    with proxied(proxy.host, proxy.port, v2("198.51.100.70", 1)) as client:
        assert client.read_reply().code == 220
        client.cmd("QUIT")
    with proxied(proxy.host, proxy.port, v2("198.51.100.71", 1) + b"EHLO eager\r\n") as client:
        reply = client.read_reply()
        assert (reply.code, reply.enhanced) == (554, "5.5.1"), reply


def test_shutdown_closes_connections_still_reading_their_header(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    proxy = start(proxy_factory, downstream.port, proxy_timeout=120)
    with RawSMTP(timeout=30) as client:
        client.connect(proxy.host, proxy.port, read_greeting=False)
        client.send(V2_SIGNATURE[:6])  # and then nothing, far from proxy_timeout
        # SIGTERM: the connection is no session yet, so nothing holds the drain up
        assert proxy.stop() == 0 and not proxy.killed, proxy.log_tail()
        assert closed_unanswered(client) == b""


# ---------------------------------------------------------------------- trust


@pytest.mark.parametrize(("peer", "trusted"), [
    ("127.0.0.1", True),
    ("127.8.9.10", True),
    ("::1", True),
    ("::ffff:127.0.0.1", True),  # an IPv4 peer on a dual-stack listener
    ("fe80::1%eth0", False),
    ("10.0.0.1", False),
    ("", False),
])
def test_default_trust_is_loopback(peer: str, trusted: bool) -> None:
    networks = trusted_networks(ServerConfig().proxy_trusted)
    assert is_trusted(peer, networks) is trusted


def test_configured_trust() -> None:
    networks = trusted_networks(("10.1.0.0/16", "2001:db8::/32", "192.0.2.5"))
    assert [is_trusted(ip, networks) for ip in ("10.1.2.3", "10.2.0.1", "2001:db8::9",
                                                  "192.0.2.5", "192.0.2.6", "127.0.0.1")] == [
        True, False, True, True, False, False]


def test_health_checks_that_reset_at_once_are_not_untrusted(
    proxy_factory: ProxyFactory, downstream: ScriptedDownstream
) -> None:
    """HAProxy's health check: connect, LOCAL header, RST. The reset often comes before the
    proxy learns the peer's address; such a connection is no stranger to count as untrusted."""
    proxy = start(proxy_factory, downstream.port)
    for _ in range(30):
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            sock.sendall(v2_local())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: proxy.metric("relayproxy_connections_total") >= 31,
               "the proxy to accept the 30 checks", 10)
    assert proxy.metric(ERRORS, {"kind": "untrusted"}) == 0
    with proxied(proxy.host, proxy.port, v1("198.51.100.90", 1)) as client:
        deliver(client)
    downstream.wait_for_messages(1)
