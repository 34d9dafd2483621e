"""Issue point 8: lifecycle. SIGTERM stops accepting, lets transactions in flight finish for up
to server.drain_timeout, then answers 421 to the rest and exits 0; SIGHUP reloads the config
atomically, and an invalid file keeps the old config running and logs why.
"""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP, data_payload
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]


def _message(marker: str, rcpt: str = "alice@relay.test") -> bytes:
    return (
        f"From: sender@example.org\r\nTo: {rcpt}\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@example.org>\r\n\r\nbody {marker}\r\n"
    ).encode()


def _open_transaction(proxy: ProxyProcess, rcpt: str, timeout: float = 5) -> RawSMTP:
    """A session with MAIL and RCPT accepted and DATA not yet sent."""
    client = RawSMTP(timeout=timeout)
    client.connect(proxy.host, proxy.port)
    assert client.ehlo("inflight.test").code == 250
    mail = client.cmd("MAIL FROM:<sender@example.org>")
    assert mail.code == 250, mail
    rcpt_reply = client.cmd(f"RCPT TO:<{rcpt}>")
    assert rcpt_reply.code == 250, rcpt_reply
    return client


def _connection_refused_or_silent(host: str, port: int) -> str:
    """Connect to the draining proxy: it must refuse, or at least never greet.

    Returns a description of what happened; raises AssertionError if a greeting came.
    """
    try:
        sock = socket.create_connection((host, port), timeout=2)
    except OSError as exc:
        return f"connect failed: {exc!r}"
    with sock:
        sock.settimeout(1.0)
        try:
            data = sock.recv(1024)
        except TimeoutError:
            return "connected, nothing received"
        except OSError as exc:
            return f"connection reset: {exc!r}"
    assert not data.startswith(b"220"), f"a new connection was greeted while draining: {data!r}"
    return f"connected, got {data!r} then close"


def _rcpt_reply(proxy: ProxyProcess, rcpt: str) -> tuple[int, str | None]:
    """One fresh session: the reply to RCPT TO:<rcpt>."""
    with RawSMTP(timeout=5) as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("reload.test")
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        reply = client.cmd(f"RCPT TO:<{rcpt}>")
        client.cmd("QUIT")
    return reply.code, reply.enhanced


def _wait_rcpt_code(
    proxy: ProxyProcess, rcpt: str, code: int, timeout: float = 10
) -> tuple[int, str | None]:
    """New sessions until RCPT gets ``code``: the SIGHUP is handled asynchronously and the
    test has no other signal that it was. Bounded in time and in sessions."""
    max_sessions = 200
    replies: list[tuple[int, str | None]] = []

    def reply_has_code() -> tuple[int, str | None] | None:
        replies.append(_rcpt_reply(proxy, rcpt))
        return replies[-1] if replies[-1][0] == code else None

    return wait_until(
        reply_has_code,
        f"RCPT {rcpt} to get {code} after reload",
        timeout,
        interval=0.05,
        describe=lambda: (
            f"RCPT {rcpt}: still {replies[-1] if replies else None} after {len(replies)} "
            f"session(s)\n{proxy.log_tail()}"
        ),
        abort=lambda: f"{max_sessions} sessions" if len(replies) >= max_sessions else None,
    )


# ---------------------------------------------------------------------- SIGTERM


def test_sigterm_idle_gets_421_inflight_finishes_and_delivers(
    mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    # A long drain timeout: everything below must happen well before it, so a proxy that
    # simply waited out the deadline fails the timing assertions.
    proxy = proxy_factory(base_config(mailboxes.port, server={"drain_timeout": 30}))
    marker = uuid.uuid4().hex
    inflight = _open_transaction(proxy, "alice@relay.test")
    idle = RawSMTP(timeout=5)
    try:
        idle.connect(proxy.host, proxy.port)
        assert idle.ehlo("idle.test").code == 250

        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)

        # The idle session is told at once (RawSMTP's 5 s timeout bounds "at once").
        shutting = idle.read_reply()
        assert (shutting.code, shutting.enhanced) == (421, "4.3.2"), shutting
        assert time.monotonic() - started < 5
        assert idle.closed_by_peer(timeout=5), "idle session not closed after its 421"

        # The listener is closed: a new client is not served.
        _connection_refused_or_silent(proxy.host, proxy.port)

        # The transaction in flight may still finish, and is really delivered.
        assert proxy.returncode is None, "proxy exited with a transaction in flight"
        data = inflight.cmd("DATA")
        assert data.code == 354, data
        inflight.send(data_payload(_message(marker)))
        dot = inflight.read_reply()
        assert (dot.code, dot.enhanced) == (250, "2.0.0"), dot
    finally:
        idle.close()
    # After its transaction the session is ended (no new transaction while shutting down).
    assert inflight.closed_by_peer(timeout=10), "in-flight session not closed after its message"
    inflight.close()

    code = proxy.wait_exit(timeout=15)
    assert code == 0, proxy.log_tail()
    assert time.monotonic() - started < 20, "proxy waited out the whole drain_timeout"
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    assert f"Subject: {marker}".encode() in delivered
    mailboxes.wait_queue_empty()
    assert len(mailboxes.deliveries()) == 1


def test_sigterm_without_sessions_exits_0(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port))
    started = time.monotonic()
    assert proxy.stop() == 0
    assert not proxy.killed
    assert time.monotonic() - started < 5
    _connection_refused_or_silent(proxy.host, proxy.port)


@pytest.mark.parametrize("stage", ["after_rcpt", "mid_data"])
def test_sigterm_drain_deadline_421_and_no_dot(
    stage: str, scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, server={"drain_timeout": 1}))
    client = _open_transaction(proxy, "bob@relay.test")
    try:
        partial = b"Subject: never finished\r\n\r\nfirst line of a body\r\n"
        if stage == "mid_data":
            assert client.cmd("DATA").code == 354
            client.send(partial)
            # The proxy streams: the downstream is in DATA before the signal.
            downstream.wait_for_command("DATA")
        downstream.wait_for_command("RCPT")

        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        reply = client.read_reply()  # 5 s RawSMTP timeout bounds the wait
        waited = time.monotonic() - started
        assert reply.code == 421, reply
        assert reply.enhanced is not None and reply.enhanced.startswith("4."), reply
        # The transaction was given its drain time before being cut.
        assert waited >= 0.9, f"421 after {waited:.2f}s, before drain_timeout = 1"
        assert client.closed_by_peer(timeout=5)
    finally:
        client.close()

    assert proxy.wait_exit(timeout=15) == 0, proxy.log_tail()
    downstream.wait_for_closed(1)
    assert downstream.messages == []
    assert not downstream.dot_received
    if stage == "mid_data":
        # The body had started to flow and was cut without its dot.
        (received,) = downstream.partial_bodies
        assert b"first line of a body" in received
    else:
        assert not any(c.upper().startswith("DATA") for c in downstream.all_commands)


# ---------------------------------------------------------------------- SIGHUP


def test_sighup_reload_applies_to_new_sessions(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    config: dict[str, Any] = base_config(downstream.port)
    proxy = proxy_factory(config)
    assert _rcpt_reply(proxy, "user@new.test") == (550, "5.7.1")
    # Relay denied locally: the downstream never heard of the recipient.
    assert not any("new.test" in c for c in downstream.all_commands)

    config["server"]["accept_domains"] = ["relay.test", "new.test"]
    proxy.reload(config)
    assert _wait_rcpt_code(proxy, "user@new.test", 250) == (250, "2.1.5")
    downstream.wait_for_command("RCPT TO:<user@new.test>")

    # A complete message to the new domain goes through after the reload.
    with RawSMTP(timeout=5) as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("reload.test")
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<user@new.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message("reloaded", "user@new.test")))
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (message,) = downstream.wait_for_messages(1)
    assert b"Subject: reloaded" in message
    # The old domain still works, and the process survived the reload.
    assert _rcpt_reply(proxy, "alice@relay.test")[0] == 250
    assert proxy.returncode is None
    assert proxy.stop() == 0


def test_sighup_invalid_file_keeps_old_config_and_logs_the_key(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    downstream = scripted()
    good: dict[str, Any] = base_config(
        downstream.port, server={"accept_domains": ["relay.test", "new.test"]}
    )
    proxy = proxy_factory(good)
    assert _rcpt_reply(proxy, "user@new.test")[0] == 250

    # Invalid, and it would also drop new.test: nothing of it may be applied.
    bad = base_config(downstream.port, server={"accept_domains": ["relay.test"],
                                               "max_recipients": "x"})
    bad["server"]["listen"] = good["server"]["listen"]
    bad["metrics"] = good["metrics"]
    proxy.reload(bad)
    log = proxy.wait_for_log("server.max_recipients")
    key_lines = [line for line in log.splitlines() if "server.max_recipients" in line]
    assert key_lines, log
    assert proxy.returncode is None, "an invalid reload stopped the proxy"
    assert _rcpt_reply(proxy, "user@new.test") == (250, "2.1.5")

    # SIGHUP still works after a failed reload: a valid file dropping new.test applies.
    fixed = dict(bad, server={k: v for k, v in bad["server"].items() if k != "max_recipients"})
    proxy.reload(fixed)
    assert _wait_rcpt_code(proxy, "user@new.test", 550) == (550, "5.7.1")
    assert proxy.stop() == 0
