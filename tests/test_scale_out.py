"""Scaling out, with real parts: HAProxy (send-proxy-v2, round robin) in front of two relayproxy
instances that share a real Redis, both forwarding to the real Postfix. The client's address
(127.0.0.2, while every proxy connection comes from HAProxy at 127.0.0.1) reaches Postfix
through XCLIENT; a per-client message limit holds across the two instances; and a Redis that
stops gives what state.on_error says, on both instances."""

from __future__ import annotations

import email
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.haproxy import HAProxy, reserved_port
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.proxyheader import wait_ready
from support.redisd import RedisServer
from support.smtpclient import RawSMTP, Reply, data_payload
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
CLIENT = "127.0.0.2"  # the "internet" client; HAProxy and the proxies talk from 127.0.0.1

LIMIT_RULES = """
[[limit]]
name = "messages-per-client"
count = "messages"
per = "client_net"
max = 2
window = 3600
"""


def instances(proxy_factory: ProxyFactory, haproxy: HAProxy, postfix: PostfixInstance,
              rules_dir: Path, **state: Any) -> list[ProxyProcess]:
    """Two proxies on HAProxy's backend ports, same rules, same [state]."""
    rules = rules_dir / "limits.toml"
    rules.write_text(LIMIT_RULES)
    started = []
    for host, port in haproxy.backends:
        config = base_config(postfix.port, server={
            "listen": [f"{host}:{port}"], "proxy_protocol": True},
            rules={"files": [str(rules)]}, state=state)
        started.append(wait_ready(proxy_factory(config, wait_ready=False)))
    return started


def through_haproxy(haproxy: HAProxy, source: str = CLIENT) -> RawSMTP:
    client = RawSMTP(timeout=15)
    client.sock = socket.create_connection((haproxy.host, haproxy.port), timeout=15,
                                           source_address=(source, 0))
    client.greeting = client.read_reply()
    assert client.greeting.code == 220, client.greeting
    return client


def send(haproxy: HAProxy, subject: str, source: str = CLIENT) -> tuple[Reply, Reply | None]:
    """One message through HAProxy: the reply to MAIL, and to the final dot if it got there."""
    with through_haproxy(haproxy, source) as client:
        assert client.ehlo("scale-client.example").code == 250
        mail = client.cmd("MAIL FROM:<sender@example.org>")
        if mail.code != 250:
            client.cmd("QUIT")
            return mail, None
        assert client.cmd("RCPT TO:<bob@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(f"Subject: {subject}\r\n\r\nscaled out\r\n".encode()))
        dot = client.read_reply()
        client.cmd("QUIT")
        return mail, dot


def postfix_received(message: bytes) -> str:
    fields = email.message_from_bytes(message).get_all("Received", [])
    (ours,) = [str(f) for f in fields if "by postfix.test" in str(f)]
    return ours


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    return tmp_path


def test_client_address_and_limit_hold_across_instances(
    proxy_factory: ProxyFactory, haproxy: HAProxy, mailboxes: PostfixInstance,
    redis_server: RedisServer, rules_dir: Path,
) -> None:
    proxies = instances(proxy_factory, haproxy, mailboxes, rules_dir,
                        redis_url=redis_server.url)
    tag = uuid.uuid4().hex[:8]
    first, second, third = (send(haproxy, f"scale-{tag}-{n}") for n in range(3))
    for mail, dot in (first, second):
        assert mail.code == 250 and dot is not None and dot.code == 250, (mail, dot)
    # the third message of the client, on whichever instance: over the shared limit
    mail, dot = third
    assert (mail.code, mail.enhanced, dot) == (451, "4.7.1", None), mail
    assert "Too many messages" in mail.text
    # round robin: both instances took part, and each logged the real client
    logged = [proxy.wait_for_transactions(1) for proxy in proxies]
    for transactions in logged:
        assert all(t["client"].startswith(f"{CLIENT}:") for t in transactions), transactions
    assert sum(len(t) for t in logged) == 3
    # Postfix heard of 127.0.0.2 through XCLIENT, not of the proxies' 127.0.0.1
    delivered = mailboxes.wait_for_deliveries(2, user="bob")
    for message in delivered:
        received = postfix_received(message)
        assert f"[{CLIENT}]" in received and "[127.0.0.1]" not in received, received
    # the limit is per client: another address still gets through, on either instance
    other_mail, other_dot = send(haproxy, f"scale-{tag}-other", source="127.0.0.3")
    assert other_mail.code == 250 and other_dot is not None and other_dot.code == 250
    # the counters live in Redis, under the configured prefix
    assert redis_server.command("EXISTS", "relayproxy:h:3600:limit:messages-per-client:"
                                f"{CLIENT}/32") == ":1"


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this test's own, which it stops (by PID)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-own")).start()
    yield server
    server.stop()


@pytest.mark.parametrize("on_error", ["tempfail", "open"])
def test_redis_stopping_gives_the_configured_behaviour(
    proxy_factory: ProxyFactory, haproxy: HAProxy, mailboxes: PostfixInstance,
    own_redis: RedisServer, rules_dir: Path, on_error: str,
) -> None:
    proxies = instances(proxy_factory, haproxy, mailboxes, rules_dir, redis_url=own_redis.url,
                        on_error=on_error, timeout=1, down_time=0)
    tag = uuid.uuid4().hex[:8]
    mail, dot = send(haproxy, f"redis-up-{tag}")
    assert mail.code == 250 and dot is not None and dot.code == 250  # Redis works
    own_redis.stop()
    before = [proxy.metric("relayproxy_state_errors_total", {"kind": "connect"})
              for proxy in proxies]
    results = [send(haproxy, f"redis-down-{tag}-{n}") for n in range(2)]  # one per instance
    for mail, dot in results:
        if on_error == "tempfail":
            assert (mail.code, mail.enhanced, dot) == (451, "4.3.0", None), mail
            assert "Shared state unavailable" in mail.text
        else:
            assert mail.code == 250 and dot is not None and dot.code == 250, (mail, dot)
    for proxy, count in zip(proxies, before, strict=True):
        assert proxy.metric("relayproxy_state_errors_total", {"kind": "connect"}) > count
        assert "state: Redis unavailable (connect)" in proxy.log_text()
    delivered = mailboxes.wait_for_deliveries(1 if on_error == "tempfail" else 3, user="bob")
    assert len(delivered) == (1 if on_error == "tempfail" else 3)


def test_haproxy_health_checks_find_the_proxy_up_and_are_not_errors(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """HAProxy's own checks (send-proxy-v2: a LOCAL header, then a reset) against a proxy
    with the PROXY protocol on: the server is UP, and no check counts as a header error."""
    port = reserved_port()
    config = base_config(mailboxes.port, server={
        "listen": [f"127.0.0.1:{port}"], "proxy_protocol": True})
    proxy = wait_ready(proxy_factory(config, wait_ready=False))
    checker = HAProxy([("127.0.0.1", port)], tmp_path_factory.mktemp("haproxy-check"),
                      check=True).start()
    try:
        wait_until(lambda: checker.server_status().get("relay0") == "UP",
                   "HAProxy to find the proxy UP", 15, interval=0.1,
                   describe=lambda: f"{checker.server_status()}\n{checker.log_text()}")
        checks = proxy.metric("relayproxy_connections_total")
        # a few more rounds of checks (every 100 ms) after the UP
        wait_until(lambda: proxy.metric("relayproxy_connections_total") >= checks + 10,
                   "ten more health checks", 15, interval=0.1)
    finally:
        checker.stop()
    for kind in ("untrusted", "missing", "malformed", "truncated", "timeout"):
        assert proxy.metric("relayproxy_proxy_protocol_errors_total", {"kind": kind}) == 0, (
            kind, proxy.log_tail())
