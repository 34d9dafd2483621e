"""The message pipeline's seam, driven from outside with test checks (tests/support/checks.py):
the held header section, the held window, streaming body observers and their backpressure,
and end-of-data verdicts at the withheld dot."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.backpressure import TOTAL, stalled_delivery
from support.postfix import PostfixInstance
from support.procstat import RssPeak
from support.proxy import PROJECT_ROOT, ProxyProcess, base_config
from support.scripted import DEFAULT_EXTENSIONS, ScriptedDownstream, dot_unstuff
from support.sink import CountingSink, stream_message
from support.smtpclient import RawSMTP, Reply, data_payload

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]
CHECKS = "tests.support.checks"


def _proxy(factory: ProxyFactory, port: int, *checks: str, env: dict[str, str] | None = None,
           **overrides: Any) -> ProxyProcess:
    config = base_config(port, plugins={"checks": [f"{CHECKS}:{c}" for c in checks]},
                         **overrides)
    return factory(config, env={"PYTHONPATH": str(PROJECT_ROOT), **(env or {})})


def _send(proxy: ProxyProcess, body: bytes, mail: str = "MAIL FROM:<s@example.org>",
          rcpt: str = "alice@relay.test") -> tuple[Reply, RawSMTP]:
    client = RawSMTP(timeout=30)
    client.connect(proxy.host, proxy.port)
    client.ehlo("pipeline.test")
    assert client.cmd(mail).code == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert client.cmd("DATA").code == 354
    client.send(data_payload(body))
    return client.read_reply(), client


def _deliver(proxy: ProxyProcess, body: bytes, **kwargs: str) -> Reply:
    reply, client = _send(proxy, body, **kwargs)
    with client:
        client.cmd("QUIT")
    return reply


def _split(message: bytes) -> tuple[bytes, bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n", body


# ---------------------------------------------------------------------- header section


def test_forged_field_removed_and_prepended_field_arrives_once(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance
) -> None:
    proxy = _proxy(proxy_factory, mailboxes.port, "StripForged")
    token = uuid.uuid4().hex
    body = (
        b"Authentication-Results: proxy.test; dkim=pass header.d=bank.example\r\n"
        b"Authentication-Results: other.example;\r\n\tspf=pass smtp.mailfrom=example.org\r\n"
        b"Subject: " + token.encode() + b"\r\n\r\nhello\r\n"
    )
    assert _deliver(proxy, body).code == 250
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    head = delivered.split(b"\n\n", 1)[0]
    assert b"proxy.test; dkim=pass" not in head, head
    assert b"Authentication-Results: other.example;\n\tspf=pass" in head, head
    assert head.count(b"X-Pipeline-Check:") == 1, head
    assert b"X-Pipeline-Check: removed=1" in head, head
    # the proxy's Received field is on top of what the checks prepended
    ours = head.index(b"by proxy.test (relayproxy)")
    assert ours < head.index(b"X-Pipeline-Check"), head


def test_overlong_header_section_refused_nothing_delivered(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, "StripForged",
                   server={"max_header_size": 64 * 1024})
    pad = b"".join(b"X-Pad-%05d: " % i + b"p" * 60 + b"\r\n" for i in range(1200))  # ~86 KB
    reply, client = _send(proxy, pad + b"Subject: big\r\n\r\nbody\r\n")
    with client:
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        # read to the terminator: the session is in step and goes on
        assert client.cmd("NOOP").code == 250
        client.cmd("QUIT")
    server.wait_for_closed(1)
    assert server.messages == [] and not server.dot_received, server.describe()
    # not one byte of the section went downstream
    assert all(b"X-Pad" not in part for part in server.partial_bodies), server.partial_bodies


def test_header_section_at_the_limit_passes(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted()
    limit = 8 * 1024
    proxy = _proxy(proxy_factory, server.port, "StripForged", server={"max_header_size": limit})
    lines = [b"X-Fill: start\r\n"] + [b"\t" + b"f" * 98 + b"\r\n"] * 80  # folded, 8 KB
    field = b"".join(lines)
    field += b"\t" + b"g" * (limit - len(field) - 3) + b"\r\n"  # exactly the limit
    assert len(field) == limit
    assert _deliver(proxy, field + b"\r\nbody\r\n").code == 250
    (message,) = server.wait_for_messages(1)
    assert field in message


def test_message_without_body_or_separator(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, "StripForged", "BodyDigest")
    assert _deliver(proxy, b"Subject: only a header\r\n").code == 250
    (message,) = server.wait_for_messages(1)
    assert message.startswith(b"Received: ")
    assert message.endswith(b"Subject: only a header\r\n"), message
    assert b"X-Body-Digest: sha256=" + hashlib.sha256(b"").hexdigest().encode() in message


# ---------------------------------------------------------------------- held window


def test_message_in_window_carries_a_field_computed_from_the_whole_body(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, "BodyDigest")
    # lines starting with "." travel stuffed: the observer must see them unstuffed
    body = b"Subject: digest\r\n\r\n" + b"".join(
        b".line %d\r\n" % i if i % 7 == 0 else b"line %d with some text\r\n" % i
        for i in range(3000))  # ~70 KB: inside the 128 KiB window
    assert _deliver(proxy, body).code == 250
    (raw,) = server.wait_for_messages(1)
    head, delivered_body = _split(dot_unstuff(raw))
    expected = hashlib.sha256(delivered_body).hexdigest()
    assert delivered_body == _split(body)[1]
    assert f"X-Body-Digest: sha256={expected} size={len(delivered_body)}".encode() in head, head
    assert b"X-Body-Observed" not in head, "told the header section left early: it did not"
    assert head.startswith(b"Received: "), head


def test_message_over_window_streams_and_end_verdict_still_decides(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, "BodyDigest", "RefuseMarked",
                   server={"hold_bytes": 16 * 1024})
    block = b"x" * 70 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + block * 4000  # ~290 KB, far over the window
    assert _deliver(proxy, big).code == 250
    (raw,) = server.wait_for_messages(1)
    head, body = _split(raw)
    assert b"X-Body-Digest" not in head, "a field written for a message that was not held"
    # told before the section left, what it knew then went with it
    assert b"octets when the header section left" in head, head
    assert body == block * 4000
    # the same size, refused by what only its end shows: streamed, but never delivered
    refused, client = _send(proxy, big + b"REFUSE-AT-END\r\n")
    with client:
        assert (refused.code, refused.enhanced) == (550, "5.7.1"), refused
        client.cmd("QUIT")
    (partial,) = server.wait_for_partial(1)
    assert len(partial) > 100_000, "the large message should have been streaming already"
    assert len(server.messages) == 1, server.describe()


def test_window_zero_never_holds(proxy_factory: ProxyFactory, scripted: ScriptedFactory) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, "BodyDigest", server={"hold_bytes": 0})
    assert _deliver(proxy, b"Subject: small\r\n\r\nsmall\r\n").code == 250
    (raw,) = server.wait_for_messages(1)
    assert b"X-Body-Digest" not in raw
    assert b"X-Body-Observed: 0 octets when the header section left" in raw


def test_hundred_megabytes_through_the_window_with_flat_rss(
    proxy_factory: ProxyFactory, counting_sink: CountingSink
) -> None:
    proxy = _proxy(proxy_factory, counting_sink.port, "BodyDigest", "StripForged",
                   server={"max_message_size": 200 * 1024 * 1024})
    line = b"0123456789" * 7 + b"abcdef\r\n"
    block = line * 13_443  # ~1 MiB
    header = b"Subject: warm\r\n\r\n"
    assert stream_message(proxy, header, block, 2).code == 250
    counting_sink.wait_for_messages(1)
    blocks = 100
    with RssPeak(proxy.pid) as rss:
        reply = stream_message(proxy, b"Subject: hundred\r\n\r\n", block, blocks)
    assert reply.code == 250, reply
    (_, message) = counting_sink.wait_for_messages(2)
    assert message.length > 100 * 1_000_000
    assert b"X-Body-Digest" not in message.head
    assert rss.growth_mib < 16, (
        f"proxy RSS grew by {rss.growth_mib:.1f} MiB (baseline {rss.baseline} KiB, "
        f"peak {rss.peak} KiB)")


# ---------------------------------------------------------------------- observers


def test_stalled_observer_slows_the_client_with_flat_rss(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory, tmp_path: Path
) -> None:
    server = scripted()
    gate = tmp_path / "gate"
    proxy = _proxy(proxy_factory, server.port, "Stalled",
                   env={"RELAYPROXY_TEST_GATE": str(gate)},
                   server={"max_message_size": 100 * 1024 * 1024})
    stalled_delivery(proxy, gate.touch, "the observer", helo="pipeline.test")
    (raw,) = server.wait_for_messages(1, timeout=30)
    assert len(raw) > TOTAL


def test_failing_observer_tempfails_and_the_session_goes_on(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, "Exploding")
    reply, client = _send(proxy, b"Subject: boom\r\n\r\n" + b"body line\r\n" * 100)
    with client:
        assert (reply.code, reply.enhanced) == (451, "4.3.0"), reply
        assert client.cmd("NOOP").code == 250
        client.cmd("QUIT")
    server.wait_for_closed(1)
    assert server.messages == [], server.describe()
    assert "check exploding failed" in proxy.log_text()


def test_unloadable_plugin_named_by_check_config(tmp_path: Path) -> None:
    from support.proxy import check_config

    config = base_config(1, plugins={"checks": [f"{CHECKS}:NoSuchCheck"]})
    result = check_config(config)
    assert result.returncode == 2, result
    assert "plugins.checks" in result.stderr and "NoSuchCheck" in result.stderr, result.stderr


# ---------------------------------------------------------------------- 8BITMIME


def test_seven_bit_downstream_gets_seven_bit_mail_and_eight_bit_is_refused(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted(extensions=[e for e in DEFAULT_EXTENSIONS if e != "8BITMIME"])
    proxy = proxy_factory(base_config(server.port))
    mail = "MAIL FROM:<s@example.org> BODY=8BITMIME"
    assert _deliver(proxy, b"Subject: plain\r\n\r\nascii only\r\n", mail=mail).code == 250
    (raw,) = server.wait_for_messages(1)
    assert b"ascii only" in raw
    assert "MAIL FROM:<s@example.org>" in server.all_commands  # BODY= not passed on
    refused, client = _send(proxy, "Subject: café\r\n\r\nnaïve\r\n".encode(), mail=mail)
    with client:
        assert (refused.code, refused.enhanced) == (554, "5.6.3"), refused
        client.cmd("QUIT")
    (partial,) = server.wait_for_partial(1)  # the connection was dropped without the dot
    assert max(partial, default=0) < 0x80, "8-bit data went to a 7-bit downstream"
    assert len(server.messages) == 1, server.describe()


@pytest.mark.parametrize("reuse", [True, False])
def test_idle_clients_do_not_hold_the_downstream_budget(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory, reuse: bool
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port, downstream={
        "max_connections": 2, "reuse_connections": reuse}))
    idle = []
    for i in range(2):
        reply, client = _send(proxy, b"Subject: idle %d\r\n\r\nx\r\n" % i)
        assert reply.code == 250, reply
        idle.append(client)  # connected, between transactions, saying nothing
    try:
        third = _deliver(proxy, b"Subject: third\r\n\r\nx\r\n")
        assert third.code == 250, third
        # and the idle ones can still send another message each
        for client in idle:
            assert client.cmd("MAIL FROM:<s@example.org>").code == 250
            assert client.cmd("RCPT TO:<bob@relay.test>").code == 250
            assert client.cmd("DATA").code == 354
            client.send(data_payload(b"Subject: again\r\n\r\ny\r\n"))
            assert client.read_reply().code == 250
    finally:
        for client in idle:
            client.close()
    server.wait_for_messages(5)
    assert server.connections <= 2 if reuse else server.connections == 5, server.describe()


def test_same_client_gets_its_connection_back_without_xclient_again(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    server = scripted(extensions=[*DEFAULT_EXTENSIONS, "XCLIENT NAME ADDR PROTO HELO PORT"])
    proxy = proxy_factory(base_config(server.port))
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("again.test")
        for i in range(3):
            assert client.cmd("MAIL FROM:<s@example.org>").code == 250
            assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
            assert client.cmd("DATA").code == 354
            client.send(data_payload(b"Subject: %d\r\n\r\nx\r\n" % i))
            assert client.read_reply().code == 250
        client.cmd("QUIT")
    server.wait_for_messages(3)
    assert server.connections == 1, server.describe()
    xclients = [c for c in server.all_commands if c.startswith("XCLIENT ")]
    assert len(xclients) == 1, server.all_commands


def test_a_hook_that_raises_when_called_tempfails_the_stage() -> None:
    """A plugin whose hook is no coroutine (or raises before it returns one) is that check's
    failure, a tempfail, never an exception that ends the session."""
    import asyncio

    from relayproxy.checks import Check, Envelope, Pipeline, SessionInfo

    class Broken(Check):
        name = "broken"

        def on_mail(self, session: SessionInfo, envelope: Envelope) -> Any:  # type: ignore[override]
            raise RuntimeError("not even a coroutine")

    verdict = asyncio.run(Pipeline([Broken()]).mail(SessionInfo("s", "192.0.2.1", 1),
                                                     Envelope("a@example.org")))
    assert verdict is not None and (verdict.code, verdict.enhanced) == (451, "4.3.0"), verdict
