"""Downstream faults (issue points 2 and 6): failover, the connection budget, connection reuse,
and "nothing lost": the client gets 250 only when the downstream said 250, downstream 4xx/5xx
are relayed as they are, timeouts and disconnects give 451 4.4.2 then 421, and a client that
disconnects mid-DATA makes the downstream deliver nothing.

The proxy answers MAIL itself and takes its downstream connection at the first RCPT that passed
its local checks; XCLIENT, MAIL and that RCPT go down then. Whatever goes wrong there (the
downstream refuses MAIL, is unreachable, busy, lacks required TLS, stalls or drops during MAIL)
is the answer to that RCPT and to every later RCPT of the transaction, and the session goes on.

Each test scripts its own downstream, so each gets its own proxy (the config names the scripted
server's port); a proxy starts in about 0.3 s.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from support.ports import LOOPBACK, free_port
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.scripted import DEFAULT_EXTENSIONS, DROP, STALL, ScriptedDownstream
from support.smtpclient import RawSMTP, Reply, data_payload, send_message
from support.wait import wait_until

ScriptedFactory = Callable[..., ScriptedDownstream]
ProxyFactory = Callable[..., ProxyProcess]

SENDER = "sender@example.org"
RCPT = "alice@relay.test"
RCPT2 = "bob@relay.test"
# MAIL is answered by the proxy itself, whatever the downstream would say.
SENDER_OK = f"250 2.1.0 Sender <{SENDER}> OK\r\n".encode()
# Small enough for every socket buffer on the way, so a stalled or dropped downstream can never
# block the client's send (the proxy must still read the body to its end before answering).
BODY = b"Subject: fault test\r\n\r\nline one\r\nline two\r\n"

# The stage names the proxy uses in "... during <stage>"; DOT may be named either way.
STAGE_WORDS = {
    "MAIL": "mail",
    "RCPT": "rcpt",
    "DATA": "data",
    "BODY": "(data|end of data|dot)",
    "DOT": "(end of data|dot)",
}


# ---------------------------------------------------------------------- helpers


def _proxy(
    proxy_factory: ProxyFactory, servers: list[int] | int, **downstream: Any
) -> ProxyProcess:
    return proxy_factory(base_config(servers, downstream=downstream))


def _session(proxy: ProxyProcess, helo: str = "client.test", timeout: float = 10) -> RawSMTP:
    client = RawSMTP(timeout=timeout)
    client.connect(proxy.host, proxy.port)
    assert client.ehlo(helo).code == 250
    return client


def _drive(client: RawSMTP, stage: str, body: bytes = BODY) -> list[Reply]:
    """One transaction up to and including the answer to the downstream's ``stage`` (MAIL,
    RCPT, DATA, BODY or DOT).

    Returns every reply; the last is the answer at ``stage`` (for BODY and DOT: the reply to
    the final dot). The downstream MAIL goes out at the first RCPT, so for MAIL the last reply
    is the one to that RCPT; the client's MAIL is always the proxy's own 250. Earlier steps
    must succeed, so a fault at the wrong stage fails clearly.
    """
    replies: list[Reply] = []
    steps = (
        ("MAIL", f"MAIL FROM:<{SENDER}>", 250),
        ("RCPT", f"RCPT TO:<{RCPT}>", 250),
        ("DATA", "DATA", 354),
    )
    answered_at = "RCPT" if stage == "MAIL" else stage
    for name, line, expected in steps:
        reply = client.cmd(line)
        replies.append(reply)
        if name == "MAIL":
            # answered locally: a downstream fault at MAIL must not show here
            assert reply.raw == SENDER_OK, f"MAIL (fault at {stage}): {reply}"
        if name == answered_at:
            return replies
        assert reply.code == expected, f"{name} before the {stage} fault: {reply}"
    client.send(data_payload(body))
    replies.append(client.read_reply())
    return replies


def _message(marker: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@example.org>\r\n\r\nbody {marker}\r\n"
    ).encode()


def _send(proxy: ProxyProcess, marker: str, helo: str = "client.test") -> dict[str, Any]:
    return send_message(proxy.host, proxy.port, SENDER, [RCPT], _message(marker), helo=helo)


def _assert_delivered_reply(result: dict[str, Any]) -> None:
    assert not result["closed"], result
    assert result["mail"].code == 250, result["mail"]
    assert [r.code for r in result["rcpt"]] == [250], result["rcpt"]
    assert result["dot"].code == 250, result["dot"]
    assert result["quit"].code == 221, result["quit"]


def _quit_and_wait_closed(client: RawSMTP) -> None:
    """QUIT, then wait until the proxy closed the connection: it releases the downstream
    connection before closing the client's, so this orders later sessions after the release."""
    assert client.cmd("QUIT").code == 221
    assert client.closed_by_peer(timeout=10), "proxy did not close the session after QUIT"
    client.close()


def _count(commands: list[str], verb: str) -> int:
    return sum(1 for c in commands if c.upper().split(" ", 1)[0] == verb)


def _assert_mail_fault_not_fatal(
    client: RawSMTP, reply: Reply, server: ScriptedDownstream, what: str
) -> None:
    """A fault during the downstream MAIL: 451 4.4.2 naming the downstream and what happened,
    as the answer to the first RCPT and (without asking again) to every later one; no 421,
    the session goes on."""
    assert reply.code == 451, reply
    assert reply.enhanced == "4.4.2", reply
    pattern = rf"4\.4\.2 downstream {re.escape(LOOPBACK)}:{server.port} {what} during mail"
    assert re.fullmatch(pattern, reply.lines[0], re.IGNORECASE), reply
    assert client.cmd(f"RCPT TO:<{RCPT2}>").raw == reply.raw
    assert server.connections == 1, server.describe()
    assert _count(server.all_commands, "MAIL") == 1, server.all_commands
    assert _count(server.all_commands, "RCPT") == 0, server.all_commands
    # Not fatal: had a 421 followed the 451, it would be read here instead of the RSET's 250.
    assert client.cmd("RSET").code == 250
    assert client.cmd("QUIT").code == 221


def _assert_fault_then_421(
    client: RawSMTP, reply: Reply, port: int, what: str, stage: str
) -> None:
    """451 4.4.2 naming the downstream, what happened and where; then 421 and the close."""
    assert reply.code == 451, reply
    assert reply.enhanced == "4.4.2", reply
    pattern = rf"4\.4\.2 downstream {re.escape(LOOPBACK)}:{port} {what} during {STAGE_WORDS[stage]}"
    assert re.fullmatch(pattern, reply.lines[0], re.IGNORECASE), reply
    closing = client.read_reply()
    assert closing.code == 421, closing
    assert closing.enhanced == "4.4.2", closing
    assert client.closed_by_peer(timeout=10), "session not closed after the 421"


# ---------------------------------------------------------------------- relayed replies

_RELAYED = {
    "4xx": ("450 4.2.1 Mailbox busy, scripted", b"450 4.2.1 Mailbox busy, scripted\r\n"),
    "5xx": (
        "553 5.7.26 Unauthenticated mail rejected, scripted",
        b"553 5.7.26 Unauthenticated mail rejected, scripted\r\n",
    ),
    "4xx-multiline": (
        ["452 4.3.1 Insufficient system storage", "452 4.3.1 try again later"],
        b"452-4.3.1 Insufficient system storage\r\n452 4.3.1 try again later\r\n",
    ),
    "5xx-multiline": (
        ["550 5.7.1 first line", "550 5.7.1 second line", "550 5.7.1 third line"],
        b"550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 third line\r\n",
    ),
}


@pytest.mark.parametrize("kind", sorted(_RELAYED))
@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", "DOT"])
def test_downstream_reply_relayed_verbatim(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, stage: str, kind: str
) -> None:
    script, expected = _RELAYED[kind]
    server = scripted({stage: script})
    proxy = _proxy(proxy_factory, server.port)
    with _session(proxy) as client:
        replies = _drive(client, stage)
        # Code, enhanced code, text and every line exactly as the downstream sent them.
        assert replies[-1].raw == expected
        if stage == "MAIL":
            # The refused MAIL is the answer to every RCPT of the transaction (sticky): the
            # downstream is not asked again, and never saw a RCPT.
            assert client.cmd(f"RCPT TO:<{RCPT2}>").raw == expected
            assert _count(server.all_commands, "MAIL") == 1, server.all_commands
            assert _count(server.all_commands, "RCPT") == 0, server.all_commands
        if stage != "DOT":
            # A refused command does not end the session: it resets and says goodbye normally.
            assert client.cmd("RSET").code == 250
        assert client.cmd("QUIT").code == 221
    if stage == "DOT":
        # The downstream got the whole message and refused it; the client was not told 250.
        assert len(server.messages) == 1
    else:
        assert server.messages == []
        assert not server.dot_received
    assert proxy.metric("relayproxy_messages_total", {"outcome": "accepted"}) == 0


_NO_ENHANCED = {
    "MAIL": ("451 try again later", ["4.0.0 try again later"]),
    "RCPT": ("550 no such user", ["5.0.0 no such user"]),
    "DOT": (["554 rejected", "554 content policy"], ["5.0.0 rejected", "5.0.0 content policy"]),
}


@pytest.mark.parametrize("stage", sorted(_NO_ENHANCED))
def test_reply_without_enhanced_code_gets_class_code(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, stage: str
) -> None:
    script, expected_lines = _NO_ENHANCED[stage]
    server = scripted({stage: script})
    proxy = _proxy(proxy_factory, server.port)
    with _session(proxy) as client:
        reply = _drive(client, stage)[-1]
        first_line = script if isinstance(script, str) else script[0]
        assert reply.code == int(first_line[:3]), reply
        # RFC 3463 class-derived x.0.0 in front of the downstream's own text, on every line.
        assert reply.lines == expected_lines, reply
        assert client.cmd("QUIT").code == 221


def test_mail_refusal_answers_every_rcpt_of_the_transaction(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    refusal = ["550 5.7.1 sender refused, scripted", "550 5.7.1 see the policy page"]
    expected = b"550-5.7.1 sender refused, scripted\r\n550 5.7.1 see the policy page\r\n"
    server = scripted({"MAIL": refusal})
    proxy = _proxy(proxy_factory, server.port)
    with _session(proxy) as client:
        assert client.cmd(f"MAIL FROM:<{SENDER}>").raw == SENDER_OK
        assert client.cmd(f"RCPT TO:<{RCPT}>").raw == expected
        assert client.cmd(f"RCPT TO:<{RCPT2}>").raw == expected
        # The downstream was asked once, at the first RCPT, and got no RCPT at all.
        assert _count(server.all_commands, "MAIL") == 1, server.all_commands
        assert _count(server.all_commands, "RCPT") == 0, server.all_commands
        # No recipient was accepted, so there is nothing to send.
        assert client.cmd("DATA").code == 554
        # A new transaction asks the downstream again.
        assert client.cmd("RSET").code == 250
        assert _drive(client, "MAIL")[-1].raw == expected
        assert _count(server.all_commands, "MAIL") == 2, server.all_commands
        assert client.cmd("QUIT").code == 221
    assert server.messages == []
    assert not server.dot_received


def test_downstream_421_at_rcpt_is_relayed_and_session_closed(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted({"RCPT": "421 4.3.0 scripted going down"})
    proxy = _proxy(proxy_factory, server.port)
    with _session(proxy) as client:
        reply = _drive(client, "RCPT")[-1]
        assert reply.raw == b"421 4.3.0 scripted going down\r\n"
        assert client.closed_by_peer(timeout=10), "session still open after a downstream 421"
    server.wait_for_closed(1)
    assert server.messages == []


def test_relay_probe_opens_no_downstream_connection(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port)
    with _session(proxy) as client:
        assert client.cmd(f"MAIL FROM:<{SENDER}>").raw == SENDER_OK
        denied = client.cmd("RCPT TO:<victim@elsewhere.example>")
        assert (denied.code, denied.enhanced) == (550, "5.7.1"), denied
        _quit_and_wait_closed(client)
    # Refused by the proxy's own checks: the mail server never heard of it.
    assert server.connections == 0, server.describe()
    # A real message afterwards takes the downstream's first connection (so none was on its
    # way for the probe), and nothing of the probe reached it.
    _assert_delivered_reply(_send(proxy, "after-probe"))
    assert server.connections == 1, server.describe()
    assert not any("elsewhere.example" in c for c in server.all_commands), server.all_commands


# ---------------------------------------------------------------------- unreachable, failover


def test_unreachable_downstream_at_mail_then_retried(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    port = free_port()  # nothing listens here (yet)
    proxy = _proxy(proxy_factory, port)
    unreachable = f"451 4.4.1 downstream {LOOPBACK}:{port} unreachable\r\n".encode()

    def connect_errors() -> float:
        return proxy.metric("relayproxy_downstream_errors_total", {"kind": "connect"})

    with _session(proxy) as client:
        # MAIL is the proxy's; the connection is tried at the first RCPT, which gets the 451.
        assert _drive(client, "MAIL")[-1].raw == unreachable
        # Every later RCPT of the transaction gets it too, without another connection attempt.
        assert client.cmd(f"RCPT TO:<{RCPT2}>").raw == unreachable
        assert connect_errors() == 1
        # Not fatal: the session goes on.
        assert client.cmd("RSET").code == 250
        assert client.cmd("NOOP").code == 250
        # A new transaction tries the downstream again.
        assert _drive(client, "MAIL")[-1].raw == unreachable
        assert connect_errors() == 2
        assert client.cmd("RSET").code == 250
        # The server comes up on that port: the next transaction must try it again and get
        # through, even though it was marked down moments ago (it is the only server there is).
        server = scripted(port=port)
        replies = _drive(client, "DOT")
        assert [r.code for r in replies] == [250, 250, 354, 250]
        assert client.cmd("QUIT").code == 221
    assert len(server.messages) == 1
    assert connect_errors() == 2


@pytest.mark.parametrize(
    "banner", ["421 4.3.2 Service not available", "554 5.3.2 No SMTP service here"]
)
def test_greeting_refusal_gives_451_441(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, banner: str
) -> None:
    server = scripted({"connect": banner})
    proxy = _proxy(proxy_factory, server.port)
    unreachable = f"451 4.4.1 downstream {server.address} unreachable\r\n".encode()
    with _session(proxy) as client:
        # MAIL is the proxy's; the greeting is refused when the first RCPT takes a connection.
        assert _drive(client, "MAIL")[-1].raw == unreachable
        # Sticky for the transaction: no second connection for the next RCPT.
        assert client.cmd(f"RCPT TO:<{RCPT2}>").raw == unreachable
        # Not fatal: no 421, the session goes on.
        assert client.cmd("RSET").code == 250
        assert client.cmd("QUIT").code == 221
    assert server.connections == 1
    # Nothing of the transaction went to a server that refused to serve.
    assert not any(c.upper().startswith("MAIL") for c in server.all_commands)


@pytest.mark.parametrize(
    "bad_connect", ["421 4.3.2 Service not available", "554 5.3.2 No SMTP service here", DROP]
)
def test_failover_to_next_server(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, bad_connect: str
) -> None:
    bad = scripted({"connect": bad_connect})
    good = scripted()
    proxy = _proxy(proxy_factory, [bad.port, good.port])
    _assert_delivered_reply(_send(proxy, "failover"))
    assert bad.connections == 1
    assert bad.messages == []
    assert len(good.messages) == 1
    (tx,) = proxy.wait_for_transactions(1)
    assert tx["downstream"] == good.address


def test_failed_server_stays_down_for_down_time(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    bad = scripted({"connect": DROP})
    good = scripted()
    # No reuse: every inbound session must pick a server afresh, or the second session would
    # just take the pooled connection to the good server and prove nothing.
    proxy = _proxy(
        proxy_factory, [bad.port, good.port], down_time=300, reuse_connections=False
    )
    for i in range(3):
        _assert_delivered_reply(_send(proxy, f"down-{i}"))
        # Tried once, at the first session; skipped while marked down.
        assert bad.connections == 1, f"session {i}: the failed server was tried again"
    assert len(good.messages) == 3
    assert good.connections == 3


def test_failed_server_retried_after_down_time(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    bad = scripted({"connect": DROP})
    good = scripted()
    proxy = _proxy(
        proxy_factory, [bad.port, good.port], down_time=0.2, reuse_connections=False
    )
    # Sessions are the clock here: keep sending (bounded in count and time) until one of them
    # finds the down time over and tries the first server again. Mail must flow throughout.
    sent = 0
    deadline = time.monotonic() + 20
    while bad.connections < 2 and sent < 2000 and time.monotonic() < deadline:
        _assert_delivered_reply(_send(proxy, f"retry-{sent}"))
        sent += 1
    assert bad.connections >= 2, (
        f"first server not retried after down_time=0.2 s ({sent} sessions sent)"
    )
    assert sent >= 2  # the first failure did not cause an immediate retry
    assert len(good.messages) == sent
    assert bad.messages == []


# ---------------------------------------------------------------------- stalls and drops


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", "DOT"])
def test_downstream_stall_times_out(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, stage: str
) -> None:
    server = scripted({stage: STALL})
    proxy = _proxy(proxy_factory, server.port, command_timeout=0.5, data_timeout=0.5)
    with _session(proxy) as client:
        replies = _drive(client, stage)
        if stage == "MAIL":
            _assert_mail_fault_not_fatal(client, replies[-1], server, "timed out")
        else:
            _assert_fault_then_421(client, replies[-1], server.port, "timed out", stage)
    # Past RCPT (DATA, body, dot) nothing may have been acknowledged with 250.
    assert all(r.code != 250 for r in replies[2:]), "something was acknowledged with 250"
    if stage == "DOT":
        # The dot went out but was never answered: the client must not have been told 250.
        assert server.dot_received
        assert replies[-1].code != 250
    # The stalled downstream connection is dropped, not left hanging.
    server.wait_for_closed(1)
    assert proxy.metric("relayproxy_downstream_errors_total", {"kind": "timeout"}) >= 1
    assert proxy.metric("relayproxy_messages_total", {"outcome": "accepted"}) == 0


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", "BODY", "DOT"])
def test_downstream_drop(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, stage: str
) -> None:
    server = scripted({stage: DROP})
    proxy = _proxy(proxy_factory, server.port)
    with _session(proxy) as client:
        replies = _drive(client, stage)
        if stage == "MAIL":
            _assert_mail_fault_not_fatal(client, replies[-1], server, "disconnected")
        else:
            _assert_fault_then_421(client, replies[-1], server.port, "disconnected", stage)
    # Past RCPT (DATA, body, dot) nothing may have been acknowledged with 250.
    assert all(r.code != 250 for r in replies[2:]), "something was acknowledged with 250"
    if stage == "BODY":
        assert server.messages == []
        assert not server.dot_received
    if stage == "DOT":
        # The downstream had the whole message when it vanished: still no 250 to the client.
        assert server.dot_received
    assert proxy.metric("relayproxy_downstream_errors_total", {"kind": "disconnect"}) >= 1
    assert proxy.metric("relayproxy_messages_total", {"outcome": "accepted"}) == 0


def test_drop_at_mail_is_not_fatal_and_next_transaction_delivers(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    # The first MAIL finds the downstream dropping the connection; after that it behaves.
    server = scripted({"MAIL": (DROP, "250 2.1.0 Ok")})
    proxy = _proxy(proxy_factory, server.port)
    with _session(proxy) as client:
        reply = _drive(client, "MAIL")[-1]
        assert reply.code == 451, reply
        assert reply.enhanced == "4.4.2", reply
        assert f"downstream {server.address} disconnected during mail" in reply.text, reply
        # No 421 follows: the session goes on, and the next transaction gets through on a
        # fresh connection.
        assert client.cmd("RSET").code == 250
        replies = _drive(client, "DOT")
        assert [r.code for r in replies] == [250, 250, 354, 250], replies
        assert client.cmd("QUIT").code == 221
    assert server.connections == 2
    assert [t.connection for t in server.transactions] == [1]
    assert proxy.metric("relayproxy_downstream_errors_total", {"kind": "disconnect"}) >= 1
    assert proxy.metric("relayproxy_messages_total", {"outcome": "accepted"}) == 1


# ---------------------------------------------------------------------- client disconnect


def _disconnect_mid_data(proxy: ProxyProcess, part: bytes) -> None:
    client = _session(proxy)
    try:
        assert [r.code for r in _drive(client, "DATA")] == [250, 250, 354]
        client.send(part)
    finally:
        client.close()


def test_client_disconnect_mid_data_scripted(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port)
    _disconnect_mid_data(proxy, b"Subject: cut off\r\n\r\nfirst line\r\nsecond li")
    (partial,) = server.wait_for_partial(1)
    # Streamed as it arrived (the proxy's Received header first), but never finished.
    assert partial.startswith(b"Received: ")
    assert b"\r\n.\r\n" not in partial
    assert not server.dot_received
    assert server.messages == []
    proxy.wait_for_log("outcome=aborted")
    assert proxy.metric("relayproxy_messages_total", {"outcome": "aborted"}) == 1
    assert proxy.metric("relayproxy_messages_total", {"outcome": "accepted"}) == 0


def test_client_disconnect_mid_data_postfix_delivers_nothing(
    mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy(proxy_factory, mailboxes.port)
    log_before = mailboxes.log_text().count("lost connection after DATA")
    marker = uuid.uuid4().hex
    _disconnect_mid_data(proxy, f"Subject: {marker}\r\n\r\nfirst line\r\nsecond".encode())
    proxy.wait_for_log("outcome=aborted")
    # Postfix saw the connection end inside DATA, i.e. without the final dot.
    wait_until(
        lambda: mailboxes.log_text().count("lost connection after DATA") > log_before,
        "Postfix to log a lost connection in DATA",
        15,
        interval=0.05,
        describe=mailboxes.log_tail,
    )
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


# ---------------------------------------------------------------------- connection budget


@pytest.mark.parametrize("reuse", [False, True])
def test_connection_budget_spent_gives_451_432(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, reuse: bool
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, max_connections=2, reuse_connections=reuse)
    first, second = _session(proxy), _session(proxy)
    third = _session(proxy, timeout=5)
    try:
        # A transaction holds its downstream connection from its first accepted RCPT on.
        for client in (first, second):
            assert [r.code for r in _drive(client, "RCPT")] == [250, 250]
        server.wait_for_connections(2)
        started = time.monotonic()
        # MAIL is the proxy's own 250; the budget is met at the first RCPT.
        busy = _drive(third, "MAIL")[-1]
        elapsed = time.monotonic() - started
        assert busy.code == 451, busy
        assert busy.enhanced == "4.3.2", busy
        # At once: the budget is not a queue (generous bound; a hang would hit the 5 s timeout).
        assert elapsed < 3, f"451 4.3.2 took {elapsed:.1f}s"
        # The rest of that transaction gets the same answer without trying again.
        assert third.cmd(f"RCPT TO:<{RCPT2}>").raw == busy.raw
        assert server.connections == 2
        # The held transactions are unaffected; one ends (RSET: its client stays connected),
        # and its connection is given back at once. Not fatal for the third: it tries anew.
        assert first.cmd("RSET").code == 250
        assert third.cmd("RSET").code == 250
        replies = _drive(third, "DOT")
        assert [r.code for r in replies] == [250, 250, 354, 250]
        assert second.cmd(f"RCPT TO:<{RCPT2}>").code == 250
        assert first.cmd("NOOP").code == 250
        _quit_and_wait_closed(third)
        _quit_and_wait_closed(second)
        _quit_and_wait_closed(first)
    finally:
        for client in (first, second, third):
            client.close()
    assert len(server.messages) == 1
    assert server.connections == (2 if reuse else 3)


@pytest.mark.parametrize("reuse", [False, True])
def test_idle_sessions_do_not_hold_the_budget(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, reuse: bool
) -> None:
    # A session gives its downstream connection back when its transaction ends, so clients
    # idling between messages do not starve others (before, the third got 451 4.3.2).
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, max_connections=1, reuse_connections=reuse)
    clients: list[RawSMTP] = []
    try:
        for i in range(3):
            client = _session(proxy)
            clients.append(client)
            replies = _drive(client, "DOT")
            assert [r.code for r in replies] == [250, 250, 354, 250], f"client {i}: {replies}"
        # The first two delivered and stayed connected, idle, all along.
        for client in clients[:2]:
            assert client.cmd("NOOP").code == 250
        for client in clients:
            _quit_and_wait_closed(client)
    finally:
        for client in clients:
            client.close()
    assert len(server.messages) == 3
    assert server.connections == (1 if reuse else 3)
    if not reuse:
        # one at a time: each was closed before the next was opened
        assert [t.connection for t in server.transactions] == [0, 1, 2]


# ---------------------------------------------------------------------- connection reuse

_XCLIENT_EXTENSIONS = [*DEFAULT_EXTENSIONS, "XCLIENT NAME ADDR PORT PROTO HELO"]


def _xclients(commands: list[str]) -> list[str]:
    return [c for c in commands if c.upper().startswith("XCLIENT ")]


def _session_with_message(proxy: ProxyProcess, helo: str) -> int:
    """A full session with HELO ``helo``; returns the client's source port."""
    client = _session(proxy, helo=helo)
    try:
        assert client.sock is not None
        port: int = client.sock.getsockname()[1]
        assert [r.code for r in _drive(client, "DOT")] == [250, 250, 354, 250]
        _quit_and_wait_closed(client)
    finally:
        client.close()
    return port


def test_connection_reused_with_xclient_again(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted(extensions=_XCLIENT_EXTENSIONS)
    proxy = _proxy(proxy_factory, server.port, reuse_connections=True)
    port1 = _session_with_message(proxy, "first.test")
    port2 = _session_with_message(proxy, "second.test")
    assert server.connections == 1
    xclients = _xclients(server.commands[0])
    assert len(xclients) == 2, f"XCLIENT not sent again on reuse: {server.commands[0]}"
    first, second = xclients
    # Each inbound session is introduced with its own identity on the shared connection.
    assert "HELO=first.test" in first.split()
    assert "HELO=second.test" in second.split()
    assert "ADDR=127.0.0.1" in first.split() and "ADDR=127.0.0.1" in second.split()
    assert f"PORT={port1}" in first.split()
    assert f"PORT={port2}" in second.split()
    assert [t.connection for t in server.transactions] == [0, 0]


def test_no_reuse_opens_a_connection_per_session(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted(extensions=_XCLIENT_EXTENSIONS)
    proxy = _proxy(proxy_factory, server.port, reuse_connections=False)
    _session_with_message(proxy, "first.test")
    server.wait_for_closed(1)  # not kept: closed with its inbound session
    _session_with_message(proxy, "second.test")
    assert server.connections == 2
    assert [len(_xclients(c)) for c in server.commands] == [1, 1]
    assert "HELO=second.test" in _xclients(server.commands[1])[0].split()
    assert [t.connection for t in server.transactions] == [0, 1]


def test_reused_connection_dropped_at_mail_is_retried_once(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    # The second MAIL overall (the first on the reused connection) finds it gone.
    server = scripted({"MAIL": ("250 2.1.0 Ok", DROP, "250 2.1.0 Ok")})
    proxy = _proxy(proxy_factory, server.port, reuse_connections=True)
    _assert_delivered_reply(_send(proxy, "first-session"))
    marker = f"second-{uuid.uuid4().hex}"
    _assert_delivered_reply(_send(proxy, marker))
    assert server.connections == 2
    assert sum(marker.encode() in m for m in server.messages) == 1  # delivered once
    assert [t.connection for t in server.transactions] == [0, 1]


def test_reused_connection_closed_while_idle(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = _proxy(proxy_factory, server.port, reuse_connections=True)
    _assert_delivered_reply(_send(proxy, "before-restart"))
    # The downstream goes away (closing the idle pooled connection) and comes back.
    port = server.port
    server.stop()
    restarted = scripted(port=port)
    marker = f"after-{uuid.uuid4().hex}"
    _assert_delivered_reply(_send(proxy, marker))
    assert len(restarted.messages) == 1
    assert marker.encode() in restarted.messages[0]
