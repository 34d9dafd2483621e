"""Reverse DNS of the client, against a real DNS server (dnsmasq) on loopback.

The name reaches Postfix through XCLIENT NAME; Postfix writes it into its own Received header,
so the delivered message shows what the proxy told it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from support.dns import DnsServer
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.smtpclient import send_message


def _deliver(proxy: ProxyProcess, postfix: PostfixInstance) -> bytes:
    subject = uuid.uuid4().hex
    body = f"Subject: {subject}\r\n\r\nhello\r\n".encode()
    replies = send_message(proxy.host, proxy.port, "s@example.org", ["alice@relay.test"], body,
                           helo="helo.client.test")
    assert replies["dot"].code == 250, replies
    (message,) = [m for m in postfix.wait_for_deliveries(1, user="alice") if subject.encode() in m]
    return message


def _postfix_received(message: bytes) -> str:
    # Postfix's header is the first Received: (it is added on top of the proxy's own)
    headers = message.split(b"\n\n", 1)[0].decode()
    unfolded = headers.replace("\n\t", " ").replace("\n ", " ")
    return next(line for line in unfolded.splitlines() if line.startswith("Received:"))


def test_confirmed_reverse_name_reaches_postfix(
    mailboxes: PostfixInstance,
    proxy_factory: Callable[..., ProxyProcess],
    dns_server: Callable[..., DnsServer],
) -> None:
    dns = dns_server(ptr={"127.0.0.1": "mx.client.test"}, a={"mx.client.test": "127.0.0.1"})
    proxy = proxy_factory(base_config(
        mailboxes.port, server={"reverse_dns": True}, dns={"nameservers": [dns.nameserver]}))
    received = _postfix_received(_deliver(proxy, mailboxes))
    assert "from helo.client.test (mx.client.test [127.0.0.1])" in received, received


def test_unconfirmed_reverse_name_is_unavailable(
    mailboxes: PostfixInstance,
    proxy_factory: Callable[..., ProxyProcess],
    dns_server: Callable[..., DnsServer],
) -> None:
    # The PTR name does not resolve back to the client: Postfix must not be told it.
    dns = dns_server(ptr={"127.0.0.1": "forged.client.test"}, a={"forged.client.test": "127.0.0.2"})
    proxy = proxy_factory(base_config(
        mailboxes.port, server={"reverse_dns": True}, dns={"nameservers": [dns.nameserver]}))
    message = _deliver(proxy, mailboxes)
    received = _postfix_received(message)
    assert "forged.client.test" not in received, received
    assert "(unknown [127.0.0.1])" in received, received
    # the proxy's own header says the same
    assert b"from helo.client.test (unknown [127.0.0.1])" in message
