"""The pass-through core (issue 2, points 1-6): listener, live downstream session, MAIL/RCPT
relaying, streamed DATA, nothing lost under concurrency, and bounded memory for large messages.

Most tests run against the real private Postfix (what it delivered to its Maildirs is the proof);
scripted downstreams are used where the test must see exactly what the proxy sent downstream,
or must make the downstream answer in a way Postfix will not.
"""

from __future__ import annotations

import contextlib
import email
import email.utils
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from support.dns import DnsServer
from support.postfix import MESSAGE_SIZE_LIMIT, PostfixInstance
from support.procstat import RssPeak
from support.proxy import ProxyProcess, base_config
from support.scripted import DEFAULT_EXTENSIONS, STALL, ScriptedDownstream
from support.sink import CountingSink, stream_message
from support.smtpclient import ConnectionClosed, RawSMTP, Reply, data_payload, send_message

ScriptedFactory = Callable[..., ScriptedDownstream]
ProxyFactory = Callable[..., ProxyProcess]

# The shared Postfix proxy's size limit: small, so the over-size test stays fast.
SMALL_LIMIT = 100_000
POSTFIX_USERS = ("alice", "bob", "carol")


# ---------------------------------------------------------------------- helpers


def _message(subject: str, body: bytes = b"Hello.\r\n", to: str = "alice@relay.test") -> bytes:
    """A complete message with every header Postfix would otherwise add itself, so what
    Postfix delivers can be compared byte for byte with what the client sent."""
    headers = (
        f"Date: {email.utils.formatdate()}\r\n"
        f"From: sender@example.org\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n"
    ).encode()
    return headers + b"\r\n" + body


def _token(prefix: str) -> str:
    return f"core-{prefix}-{uuid.uuid4().hex[:12]}"


def _code(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.enhanced


def _subjects(messages: list[bytes]) -> list[str]:
    found = []
    for raw in messages:
        match = re.search(rb"^Subject: (\S+)$", raw, re.MULTILINE)
        found.append(match.group(1).decode() if match else "<no subject>")
    return found


def _received_headers(raw: bytes) -> list[str]:
    return [str(h) for h in email.message_from_bytes(raw).get_all("Received", [])]


def _postfix_reply(postfix: PostfixInstance, commands: list[str]) -> Reply:
    """Ask Postfix directly; the last command's reply is what the proxy must relay verbatim."""
    with RawSMTP() as client:
        client.connect(postfix.host, postfix.port)
        client.ehlo("direct.test")
        reply: Reply | None = None
        for command in commands:
            reply = client.cmd(command)
        client.cmd("QUIT")
    assert reply is not None
    return reply


def _connect_from(host: str, port: int, source: str, timeout: float = 10) -> RawSMTP:
    """A RawSMTP client whose socket is bound to ``source`` (another loopback address), so
    the downstream can tell the real client's address from the proxy's own."""
    client = RawSMTP(timeout=timeout)
    client.sock = socket.create_connection((host, port), timeout=timeout,
                                           source_address=(source, 0))
    client.greeting = client.read_reply()
    return client


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _free_port_v6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pf_proxy(
    postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One proxy in front of the session Postfix for every test here with this config.

    max_connections_per_ip is raised because every test client is 127.0.0.1."""
    config = base_config(
        postfix.port,
        server={"max_message_size": SMALL_LIMIT, "max_connections_per_ip": 1000},
    )
    proxy = ProxyProcess(config, workdir=tmp_path_factory.mktemp("core-proxy"))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def pfx(pf_proxy: ProxyProcess, mailboxes: PostfixInstance) -> ProxyProcess:
    """The shared Postfix proxy, with Postfix's queue and mailboxes emptied first."""
    if pf_proxy.returncode is not None:
        pytest.fail(f"shared proxy exited ({pf_proxy.returncode}):\n{pf_proxy.log_tail()}")
    return pf_proxy


def _scripted_proxy(
    proxy_factory: ProxyFactory, downstream_server: ScriptedDownstream, /, **overrides: Any
) -> ProxyProcess:
    return proxy_factory(base_config(downstream_server.port, **overrides))


# ---------------------------------------------------------------------- 1. listener


def test_banner_and_ehlo_extensions(pfx: ProxyProcess) -> None:
    with RawSMTP() as client:
        greeting = client.connect(pfx.host, pfx.port)
        assert greeting is not None
        assert greeting.raw == b"220 proxy.test ESMTP\r\n"
        ehlo = client.ehlo("core-client.test")
        assert ehlo.code == 250
        assert ehlo.lines[0] == "proxy.test"
        extensions = client.extensions
        assert {"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= extensions.keys()
        assert extensions["SIZE"] == str(SMALL_LIMIT)
        # No certificate configured: advertising STARTTLS would be a lie.
        assert "STARTTLS" not in extensions
        assert client.cmd("QUIT").code == 221


def test_helo_session_delivers(pfx: ProxyProcess, mailboxes: PostfixInstance) -> None:
    subject = _token("helo")
    with RawSMTP() as client:
        client.connect(pfx.host, pfx.port)
        helo = client.cmd("HELO core-helo.test")
        assert helo.code == 250, helo
        assert helo.lines == ["proxy.test"]
        assert _code(client.cmd("MAIL FROM:<sender@example.org>"))[0] == 250
        assert client.cmd("RCPT TO:<bob@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message(subject, to="bob@relay.test")))
        dot = client.read_reply()
        assert (dot.code, dot.enhanced) == (250, "2.0.0"), dot
        client.cmd("QUIT")
    (delivered,) = mailboxes.wait_for_deliveries(1, user="bob")
    assert _subjects([delivered]) == [subject]
    # The proxy's Received header says the client spoke plain SMTP (HELO), not ESMTP.
    (ours,) = [h for h in _received_headers(delivered) if "(relayproxy)" in h]
    assert "from core-helo.test" in ours and " with SMTP " in ours, ours


def test_every_reply_carries_enhanced_code(pfx: ProxyProcess, mailboxes: PostfixInstance) -> None:
    """Replies to MAIL/RCPT/DATA/RSET/NOOP/QUIT, the proxy's own and Postfix's, positive and
    negative, all carry an RFC 3463 code of the same class as the reply code."""
    seen: list[tuple[str, Reply]] = []

    def cmd(client: RawSMTP, line: str) -> Reply:
        reply = client.cmd(line)
        seen.append((line, reply))
        return reply

    with RawSMTP() as client:
        client.connect(pfx.host, pfx.port)
        cmd(client, "MAIL FROM:<sender@example.org>")  # before EHLO: 503
        client.ehlo("core-client.test")
        cmd(client, "RCPT TO:<alice@relay.test>")  # before MAIL: 503
        cmd(client, "DATA")  # before MAIL: 503
        cmd(client, "MAIL FROM sender@example.org")  # syntax: 501
        cmd(client, "MAIL FROM:<sender@example.org> FOO=BAR")  # unknown parameter: 555
        cmd(client, "NOOP")
        assert cmd(client, "MAIL FROM:<sender@example.org>").code == 250  # Postfix's
        cmd(client, "MAIL FROM:<sender@example.org>")  # nested: 503
        cmd(client, "RCPT TO:<someone@elsewhere.example>")  # relay denied: 550
        cmd(client, "RCPT TO:<nobody@relay.test>")  # Postfix's 550 5.1.1
        cmd(client, "DATA")  # no valid recipients: 554
        cmd(client, "RSET")
        cmd(client, "MAIL FROM:<sender@example.org>")
        cmd(client, "RCPT TO:<alice@relay.test>")
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message(_token("enh"))))
        seen.append(("<final dot>", client.read_reply()))
        cmd(client, "QUIT")
    missing = [
        f"{line!r} -> {reply}"
        for line, reply in seen
        if reply.enhanced is None or reply.enhanced[0] != str(reply.code)[0]
    ]
    assert not missing, "replies without a matching enhanced code:\n" + "\n".join(missing)
    codes = [reply.code for _, reply in seen]
    assert codes == [503, 503, 503, 501, 555, 250, 250, 503, 550, 550, 554, 250, 250, 250,
                     250, 221], seen
    mailboxes.wait_for_deliveries(1, user="alice")


def test_listens_on_ipv6_loopback(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance
) -> None:
    if not _ipv6_loopback_available():
        pytest.skip("this machine has no ::1 (binding an IPv6 socket to it failed)")
    v6_port = _free_port_v6()
    config = base_config(mailboxes.port)
    config["server"]["listen"].append(f"[::1]:{v6_port}")
    proxy_factory(config)
    subject = _token("ipv6")
    replies = send_message("::1", v6_port, "sender@example.org", ["carol@relay.test"],
                           _message(subject, to="carol@relay.test"))
    assert replies["greeting"].raw == b"220 proxy.test ESMTP\r\n"
    assert _code(replies["dot"]) == (250, "2.0.0"), replies
    (delivered,) = mailboxes.wait_for_deliveries(1, user="carol")
    assert _subjects([delivered]) == [subject]
    (ours,) = [h for h in _received_headers(delivered) if "(relayproxy)" in h]
    assert "[IPv6:::1]" in ours, ours


# ---------------------------------------------------------------------- 2. downstream session


def test_no_downstream_connection_without_accepted_mail(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    """Scanners and relay probes cost the downstream nothing: sessions without MAIL, MAIL
    commands refused by the proxy's own checks, and transactions whose recipients the proxy
    refuses (relay probes) open no connection; MAIL alone does not either."""
    server = scripted()
    proxy = _scripted_proxy(proxy_factory, server, server={"max_message_size": SMALL_LIMIT})
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        assert client.cmd("QUIT").code == 221
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        assert client.ehlo("scanner.test").code == 250
        assert client.cmd("NOOP").code == 250
        assert client.cmd("RSET").code == 250
        assert client.cmd("QUIT").code == 221
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        assert client.cmd("HELO scanner.test").code == 250
        assert client.cmd("QUIT").code == 221
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("scanner.test")
        too_big = client.cmd(f"MAIL FROM:<a@example.org> SIZE={SMALL_LIMIT + 1}")
        assert _code(too_big) == (552, "5.3.4"), too_big
        assert client.cmd("MAIL FROM:<unbalanced@example.org").code == 501
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 503
        assert client.cmd("QUIT").code == 221
    with RawSMTP() as client:  # a relay probe
        client.connect(proxy.host, proxy.port)
        client.ehlo("scanner.test")
        assert client.cmd("MAIL FROM:<probe@example.org>").code == 250
        assert client.cmd("RCPT TO:<victim@elsewhere.example>").code == 550
        assert client.cmd("RCPT TO:<other@elsewhere.example>").code == 550
        assert client.cmd("DATA").code == 554
        assert client.cmd("QUIT").code == 221
    assert server.connections == 0, server.describe()
    # Positive control: the first RCPT that passes opens exactly one connection, with MAIL
    # then RCPT. Had any earlier session connected, that connection would have been accepted
    # (and recorded) before this one.
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("sender.test")
        assert client.cmd("MAIL FROM:<control@example.org>").code == 250
        assert server.connections == 0, server.describe()
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert server.connections == 1, server.describe()
        assert server.commands[0][-2:] == ["MAIL FROM:<control@example.org>",
                                           "RCPT TO:<alice@relay.test>"]
        client.cmd("QUIT")


def test_xclient_passes_client_identity_to_postfix(
    proxy_factory: ProxyFactory,
    mailboxes: PostfixInstance,
    dns_server: Callable[..., DnsServer],
) -> None:
    """Postfix's own Received header names the real client (address from 127.0.0.2, its HELO,
    and its forward-confirmed reverse name), not the proxy's 127.0.0.1 connection."""
    dns = dns_server(ptr={"127.0.0.2": "core-client.example.org"},
                     a={"core-client.example.org": "127.0.0.2"})
    proxy = proxy_factory(base_config(
        mailboxes.port,
        server={"reverse_dns": True},
        dns={"nameservers": [dns.nameserver]},
    ))
    subject = _token("xclient")
    client = _connect_from(proxy.host, proxy.port, "127.0.0.2")
    with client:
        assert client.ehlo("core-helo.example").code == 250
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<carol@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message(subject, to="carol@relay.test")))
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (delivered,) = mailboxes.wait_for_deliveries(1, user="carol")
    (postfix_received,) = [h for h in _received_headers(delivered) if "by postfix.test" in h]
    assert "from core-helo.example (core-client.example.org [127.0.0.2])" in postfix_received, (
        postfix_received)


def test_xclient_attributes_sent_downstream(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted(extensions=[*DEFAULT_EXTENSIONS, "XCLIENT NAME ADDR PROTO HELO PORT"])
    proxy = _scripted_proxy(proxy_factory, server)
    client = _connect_from(proxy.host, proxy.port, "127.0.0.2")
    with client:
        assert client.sock is not None
        client_port = client.sock.getsockname()[1]
        assert client.cmd("HELO old-style.example").code == 250
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        client.cmd("QUIT")
    server.wait_for_command("MAIL")
    (xclient,) = [c for c in server.all_commands if c.upper().startswith("XCLIENT ")]
    attributes = dict(item.split("=", 1) for item in xclient.split()[1:])
    assert attributes == {
        "ADDR": "127.0.0.2",
        "PORT": str(client_port),
        "NAME": "[UNAVAILABLE]",  # reverse_dns is off in the test config
        "HELO": "old-style.example",
        "PROTO": "SMTP",
    }, xclient
    # XCLIENT restarts the downstream session, so the proxy greets again before MAIL.
    commands = server.commands[0]
    assert commands.index(xclient) < len(commands) - 3
    assert commands[commands.index(xclient) + 1].startswith("EHLO ")


def test_one_downstream_session_for_several_transactions_postfix(
    pfx: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    subjects = [_token("first"), _token("second")]
    with RawSMTP() as client:
        client.connect(pfx.host, pfx.port)
        client.ehlo("core-client.test")
        for subject, user in zip(subjects, ("alice", "bob"), strict=True):
            assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
            assert client.cmd(f"RCPT TO:<{user}@relay.test>").code == 250
            assert client.cmd("DATA").code == 354
            client.send(data_payload(_message(subject, to=f"{user}@relay.test")))
            assert _code(client.read_reply()) == (250, "2.0.0")
        client.cmd("QUIT")
    alice = mailboxes.wait_for_deliveries(1, user="alice")
    bob = mailboxes.wait_for_deliveries(1, user="bob")
    assert _subjects(alice) == subjects[:1]
    assert _subjects(bob) == subjects[1:]


def test_one_downstream_session_for_several_transactions_scripted(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = _scripted_proxy(proxy_factory, server)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        for i in range(3):
            assert client.cmd(f"MAIL FROM:<s{i}@example.org>").code == 250
            assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
            assert client.cmd("DATA").code == 354
            client.send(data_payload(_message(f"tx{i}")))
            assert client.read_reply().code == 250
            # An explicit RSET between transactions must not cost a new connection either.
            assert client.cmd("RSET").code == 250
        client.cmd("QUIT")
    server.wait_for_messages(3)
    assert server.connections == 1, server.describe()
    assert [t.connection for t in server.transactions] == [0, 0, 0]
    mails = [c for c in server.commands[0] if c.startswith("MAIL ")]
    assert mails == [f"MAIL FROM:<s{i}@example.org>" for i in range(3)]


# ---------------------------------------------------------------------- 3. MAIL FROM


def test_mail_reply_from_postfix_relayed_verbatim(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance
) -> None:
    """MAIL is answered by the proxy; the downstream's refusal of it is the answer to every
    RCPT of that transaction, word for word."""
    # a SIZE the proxy allows and Postfix (message_size_limit) does not
    proxy = proxy_factory(base_config(mailboxes.port,
                                      server={"max_message_size": 4 * MESSAGE_SIZE_LIMIT}))
    refused = f"MAIL FROM:<sender@example.org> SIZE={2 * MESSAGE_SIZE_LIMIT}"
    direct_refused = _postfix_reply(mailboxes, [refused])
    assert direct_refused.code >= 500, direct_refused  # premise: Postfix refuses it itself
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        assert client.cmd(refused).code == 250
        first = client.cmd("RCPT TO:<alice@relay.test>")
        second = client.cmd("RCPT TO:<bob@relay.test>")
        assert first.raw == direct_refused.raw, first
        assert second.raw == direct_refused.raw, second
        assert client.cmd("DATA").code == 554  # no recipient was accepted
        assert client.cmd("RSET").code == 250
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        client.cmd("QUIT")


def test_mail_multiline_downstream_replies_relayed_verbatim(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    temp = ["451-4.7.1 Greylisted, see", "451-4.7.1 https://greylist.example/why",
            "451 4.7.1 please retry in 5 minutes"]
    perm = ["550-5.7.1 Sender blocked by policy", "550 5.7.1 contact postmaster@example.net"]
    server = scripted({"MAIL": ([*temp], [*perm], "250 2.1.0 Ok")})
    proxy = _scripted_proxy(proxy_factory, server)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        first = client.cmd("RCPT TO:<alice@relay.test>")
        assert first.raw == b"".join(
            f"{line[:3]}{'-' if i < len(temp) - 1 else ' '}{line[4:]}\r\n".encode()
            for i, line in enumerate(temp)
        )
        assert client.cmd("RSET").code == 250
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        second = client.cmd("RCPT TO:<alice@relay.test>")
        assert (second.code, second.lines) == (550, [line[4:] for line in perm])
        assert second.raw == b"".join(
            f"{line[:3]}{'-' if i < len(perm) - 1 else ' '}{line[4:]}\r\n".encode()
            for i, line in enumerate(perm)
        )
        # The session and its downstream go on after refusals.
        assert client.cmd("RSET").code == 250
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        client.cmd("QUIT")
    assert server.connections == 1, server.describe()


def test_null_sender_delivered(pfx: ProxyProcess, mailboxes: PostfixInstance) -> None:
    subject = _token("null")
    replies = send_message(pfx.host, pfx.port, "", ["alice@relay.test"], _message(subject))
    assert replies["mail"].code == 250, replies
    assert _code(replies["dot"]) == (250, "2.0.0"), replies
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    assert delivered.startswith(b"Return-Path: <>\n"), delivered[:200]
    assert _subjects([delivered]) == [subject]


def test_mail_size_parameter_over_limit_refused(
    pfx: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    with RawSMTP() as client:
        client.connect(pfx.host, pfx.port)
        client.ehlo("core-client.test")
        over = client.cmd(f"MAIL FROM:<sender@example.org> SIZE={SMALL_LIMIT + 1}")
        assert _code(over) == (552, "5.3.4"), over
        # Exactly the advertised limit is allowed.
        at_limit = client.cmd(f"MAIL FROM:<sender@example.org> SIZE={SMALL_LIMIT}")
        assert at_limit.code == 250, at_limit
        client.cmd("QUIT")


def test_mail_parameters_forwarded(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()  # advertises SIZE, 8BITMIME and SMTPUTF8, but not DSN
    proxy = _scripted_proxy(proxy_factory, server)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<a@b.example> SIZE=123 BODY=8BITMIME").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("RSET").code == 250
        # RET/ENVID need DSN downstream: refused openly (RFC 3461), never dropped silently
        assert client.cmd("MAIL FROM:<c@d.example> RET=HDRS ENVID=abc SMTPUTF8").code == 250
        refused = client.cmd("RCPT TO:<alice@relay.test>")
        assert _code(refused) == (555, "5.5.4"), refused
        assert "DSN" in refused.text, refused
        assert client.cmd("RSET").code == 250
        assert client.cmd("MAIL FROM:<c@d.example> SMTPUTF8").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        # the proxy has seen this downstream's EHLO: it no longer offers DSN itself
        assert "DSN" not in client.ehlo("core-client.test").lines
        client.cmd("QUIT")
    server.wait_for_command("MAIL", count=2)
    mails = [c for c in server.all_commands if c.startswith("MAIL ")]
    assert mails == ["MAIL FROM:<a@b.example> SIZE=123 BODY=8BITMIME",
                     "MAIL FROM:<c@d.example> SMTPUTF8"]


# ---------------------------------------------------------------------- 4. RCPT TO


def test_rcpt_outside_accept_domains_denied_locally(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = _scripted_proxy(proxy_factory, server)  # accept_domains = ["relay.test"]
    denied = ["someone@elsewhere.example", "x@sub.relay.test", "x@relay.test.evil.example",
              "x@notrelay.test"]
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        for rcpt in denied:
            reply = client.cmd(f"RCPT TO:<{rcpt}>")
            assert _code(reply) == (550, "5.7.1"), (rcpt, reply)
        assert client.cmd("RCPT TO:<bob@RELAY.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message("relay")))
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (transaction,) = server.transactions
    assert transaction.rcpts == ["RCPT TO:<bob@RELAY.test>"]
    rcpts = [c for c in server.all_commands if c.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<bob@RELAY.test>"], "denied recipients reached the downstream"


def test_rcpt_subdomain_entries(scripted: ScriptedFactory, proxy_factory: ProxyFactory) -> None:
    server = scripted()
    proxy = _scripted_proxy(proxy_factory, server, server={"accept_domains": [".sub.test"]})
    accepted = ["a@x.sub.test", "b@deep.x.sub.test", "c@X.Sub.Test"]
    # ".sub.test" means subdomains (as in Postfix): not the parent itself, and only at a label
    # boundary.
    denied = ["d@sub.test", "e@evilsub.test", "f@x.sub.test.evil", "g@relay.test"]
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        for rcpt in accepted:
            assert client.cmd(f"RCPT TO:<{rcpt}>").code == 250, rcpt
        for rcpt in denied:
            assert _code(client.cmd(f"RCPT TO:<{rcpt}>")) == (550, "5.7.1"), rcpt
        client.cmd("QUIT")
    server.wait_for_closed(1)
    rcpts = [c for c in server.all_commands if c.startswith("RCPT")]
    assert rcpts == [f"RCPT TO:<{r}>" for r in accepted]


def test_unknown_user_gets_postfix_reply(pfx: ProxyProcess, mailboxes: PostfixInstance) -> None:
    direct = _postfix_reply(
        mailboxes, ["MAIL FROM:<sender@example.org>", "RCPT TO:<nobody@relay.test>"]
    )
    assert _code(direct) == (550, "5.1.1"), direct
    with RawSMTP() as client:
        client.connect(pfx.host, pfx.port)
        client.ehlo("core-client.test")
        client.cmd("MAIL FROM:<sender@example.org>")
        reply = client.cmd("RCPT TO:<nobody@relay.test>")
        client.cmd("QUIT")
    assert reply.raw == direct.raw
    assert "User unknown" in reply.text, reply


def test_rejected_recipient_does_not_end_transaction(
    pfx: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    subject = _token("partial-rcpts")
    with RawSMTP() as client:
        client.connect(pfx.host, pfx.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert _code(client.cmd("RCPT TO:<nobody@relay.test>")) == (550, "5.1.1")
        assert _code(client.cmd("RCPT TO:<x@elsewhere.example>")) == (550, "5.7.1")
        assert client.cmd("RCPT TO:<bob@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message(subject)))
        assert _code(client.read_reply()) == (250, "2.0.0")
        client.cmd("QUIT")
    mailboxes.wait_for_deliveries(1, user="alice")
    mailboxes.wait_for_deliveries(1, user="bob")
    mailboxes.wait_queue_empty()
    assert _subjects(mailboxes.deliveries("alice")) == [subject]
    assert _subjects(mailboxes.deliveries("bob")) == [subject]
    assert mailboxes.deliveries("carol") == []


def test_too_many_recipients(scripted: ScriptedFactory, proxy_factory: ProxyFactory) -> None:
    server = scripted()
    proxy = _scripted_proxy(proxy_factory, server, server={"max_recipients": 3})
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        for i in range(3):
            assert client.cmd(f"RCPT TO:<u{i}@relay.test>").code == 250
        for i in range(3, 5):
            assert _code(client.cmd(f"RCPT TO:<u{i}@relay.test>")) == (452, "4.5.3")
        # The transaction goes on with the first three.
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message("many")))
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (transaction,) = server.transactions
    assert transaction.rcpts == [f"RCPT TO:<u{i}@relay.test>" for i in range(3)]
    assert sum(c.startswith("RCPT") for c in server.all_commands) == 3


# ---------------------------------------------------------------------- 5. DATA


def test_delivered_body_is_byte_exact(pfx: ProxyProcess, mailboxes: PostfixInstance) -> None:
    subject = _token("bytes")
    body = b"\r\n".join([
        b".leading dot",          # sent as "..leading dot"
        b"..two leading dots",    # sent as "...two leading dots"
        b".",                     # a lone dot, sent as ".."
        b"trailing dot.",
        "caf\u00e9 na\u00efve \u20ac \U0001f600".encode(),  # UTF-8
        b"latin-1 \xe9\xff\x80 bytes",  # 8-bit, not UTF-8
        b"L" * 990,               # long, but under the 998 limit
        b"   indented with trailing spaces   ",
        b"\ttab",
        b"",
        b"last line",
    ]) + b"\r\n"
    message = _message(subject, body)
    replies = send_message(pfx.host, pfx.port, "sender@example.org", ["alice@relay.test"],
                           message, mail_params="BODY=8BITMIME")
    assert _code(replies["dot"]) == (250, "2.0.0"), replies
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    # Maildir files have LF line ends; otherwise the message must be exactly what was sent
    # (Postfix's and the proxy's trace headers precede it).
    expected = message.replace(b"\r\n", b"\n")
    assert delivered.endswith(expected), (
        f"delivered message differs from what was sent; delivered tail:\n"
        f"{delivered[-len(expected) - 200:]!r}"
    )


def test_proxy_adds_its_received_header(pfx: ProxyProcess, mailboxes: PostfixInstance) -> None:
    subject = _token("received")
    replies = send_message(pfx.host, pfx.port, "sender@example.org", ["alice@relay.test"],
                           _message(subject), helo="core-helo.test")
    assert replies["dot"].code == 250, replies
    (delivered,) = mailboxes.wait_for_deliveries(1, user="alice")
    received = _received_headers(delivered)
    ours = [h for h in received if "by proxy.test (relayproxy)" in h]
    assert len(ours) == 1, received
    assert "from core-helo.test" in ours[0] and "[127.0.0.1]" in ours[0], ours[0]
    # Trace headers are prepended: Postfix's (added later) is above the proxy's.
    assert "by postfix.test" in received[0], received
    assert received.index(ours[0]) == 1, received


def test_message_over_size_limit_refused_and_not_delivered(
    pfx: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    big_subject, small_subject = _token("too-big"), _token("after-big")
    line = b"0123456789" * 7 + b"abcdef\r\n"
    big = _message(big_subject, line * (SMALL_LIMIT // len(line) + 200))
    assert len(big) > SMALL_LIMIT
    with RawSMTP() as client:
        client.connect(pfx.host, pfx.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(big))
        refused = client.read_reply()
        assert _code(refused) == (552, "5.3.4"), refused
        # The session goes on; a second message in it is delivered normally.
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message(small_subject)))
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    mailboxes.wait_for_deliveries(1, user="alice")
    mailboxes.wait_queue_empty()
    assert _subjects(mailboxes.deliveries()) == [small_subject]


def test_final_reply_is_the_downstream_verdict(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted({"DOT": ("554 5.7.1 content rejected", "451 4.3.0 try later",
                               "250 2.0.0 Ok: queued as CORE3")})
    proxy = _scripted_proxy(proxy_factory, server)
    expected = [b"554 5.7.1 content rejected\r\n", b"451 4.3.0 try later\r\n",
                b"250 2.0.0 Ok: queued as CORE3\r\n"]
    got = []
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        for i in range(3):
            assert client.cmd("MAIL FROM:<a@example.org>").code == 250
            assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
            assert client.cmd("DATA").code == 354
            client.send(data_payload(_message(f"verdict{i}")))
            got.append(client.read_reply().raw)
        client.cmd("QUIT")
    assert got == expected
    assert len(server.transactions) == 3  # each verdict came after the dot went downstream


def test_no_250_while_downstream_has_not_answered_the_dot(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    """The downstream never answers the final dot: the client must get a 4xx (the message
    may or may not have been taken), never a 250."""
    server = scripted({"DOT": STALL})
    proxy = _scripted_proxy(proxy_factory, server, downstream={"data_timeout": 1.0})
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("core-client.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(_message("stalled")))
        reply = client.read_reply()
    assert _code(reply) == (451, "4.4.2"), reply
    assert server.dot_received


# ---------------------------------------------------------------------- 6. nothing lost


@dataclass
class _Outcome:
    subject: str
    code: int | None  # the final reply: the dot's, or the first refusal before it
    enhanced: str | None
    stage: str
    delivered_ok: bool  # the client got 250 for the message


def _one_session(
    host: str, port: int, index: int, run: str, barrier: threading.Barrier | None
) -> _Outcome:
    subject = f"core-{run}-{index:03d}-{uuid.uuid4().hex[:8]}"
    user = POSTFIX_USERS[index % len(POSTFIX_USERS)]
    stage = "connect"
    client = RawSMTP(timeout=30)
    try:
        client.connect(host, port)
        stage = "ehlo"
        ehlo = client.ehlo("load.test")
        if ehlo.code != 250:
            return _Outcome(subject, ehlo.code, ehlo.enhanced, stage, False)
        if barrier is not None:
            # All sessions send MAIL and RCPT at (nearly) the same moment, so the budget
            # really is contended.
            barrier.wait(timeout=30)
        for stage, line in (("mail", "MAIL FROM:<load@example.org>"),
                            ("rcpt", f"RCPT TO:<{user}@relay.test>")):
            reply = client.cmd(line)
            if reply.code != 250:
                return _Outcome(subject, reply.code, reply.enhanced, stage, False)
        stage = "data"
        reply = client.cmd("DATA")
        if reply.code != 354:
            return _Outcome(subject, reply.code, reply.enhanced, stage, False)
        stage = "dot"
        client.send(data_payload(_message(subject, to=f"{user}@relay.test")))
        reply = client.read_reply()
        with contextlib.suppress(OSError, ConnectionClosed):
            client.cmd("QUIT")
        return _Outcome(subject, reply.code, reply.enhanced, stage, reply.code == 250)
    except (OSError, ConnectionClosed, threading.BrokenBarrierError) as exc:
        if barrier is not None and stage in ("connect", "ehlo"):
            barrier.abort()  # the others must not wait for a session that will never come
        return _Outcome(subject, None, repr(exc), stage, False)
    finally:
        client.close()


def _run_load(
    proxy: ProxyProcess, sessions: int, workers: int, run: str, contended: bool
) -> list[_Outcome]:
    barrier = threading.Barrier(sessions) if contended else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(_one_session, proxy.host, proxy.port, i, run, barrier)
            for i in range(sessions)
        ]
        return [f.result(timeout=60) for f in futures]


def _assert_delivered_exactly_accepted(
    outcomes: list[_Outcome], mailboxes: PostfixInstance
) -> Counter[str]:
    accepted = {o.subject for o in outcomes if o.delivered_ok}
    if accepted:
        mailboxes.wait_for_deliveries(len(accepted), timeout=40)
    mailboxes.wait_queue_empty(timeout=40)
    delivered = Counter(_subjects(mailboxes.deliveries()))
    assert set(delivered) == accepted, (
        f"delivered but not accepted: {sorted(set(delivered) - accepted)[:10]}; "
        f"accepted but not delivered: {sorted(accepted - set(delivered))[:10]}"
    )
    duplicates = {s: n for s, n in delivered.items() if n != 1}
    assert not duplicates, f"delivered more than once: {duplicates}"
    return delivered


def test_concurrent_sessions_with_spent_downstream_budget_lose_nothing(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance
) -> None:
    proxy = proxy_factory(base_config(
        mailboxes.port,
        server={"max_connections": 1000, "max_connections_per_ip": 1000},
        downstream={"max_connections": 40},
    ))
    outcomes = _run_load(proxy, sessions=300, workers=300, run="budget", contended=True)
    not_4xx = [o for o in outcomes if not o.delivered_ok and not (
        o.code is not None and 400 <= o.code < 500)]
    assert not not_4xx, f"non-250 outcomes that are not 4xx: {not_4xx[:10]}"
    busy = [o for o in outcomes if (o.stage, o.code, o.enhanced) == ("rcpt", 451, "4.3.2")]
    ok = [o for o in outcomes if o.delivered_ok]
    # With 300 MAILs at once and a budget of 40, both must have happened.
    assert busy, "no session got 451 4.3.2 although the downstream budget was 40"
    assert ok, f"no session got 250; outcomes: {Counter((o.stage, o.code) for o in outcomes)}"
    _assert_delivered_exactly_accepted(outcomes, mailboxes)


def test_concurrent_sessions_within_budget_all_delivered_once(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance
) -> None:
    # 150 client sessions at a time against a budget of 200 (and Postfix's 200 smtpd
    # processes): every one of them must get a downstream session.
    proxy = proxy_factory(base_config(
        mailboxes.port,
        server={"max_connections": 1000, "max_connections_per_ip": 1000},
        downstream={"max_connections": 200},
    ))
    outcomes = _run_load(proxy, sessions=300, workers=150, run="ample", contended=False)
    failed = [o for o in outcomes if not o.delivered_ok]
    assert not failed, f"{len(failed)} sessions not accepted, e.g. {failed[:5]}"
    delivered = _assert_delivered_exactly_accepted(outcomes, mailboxes)
    assert sum(delivered.values()) == 300


# ---------------------------------------------------------------------- bounded memory


def test_large_message_streamed_with_bounded_memory(
    proxy_factory: ProxyFactory, counting_sink: CountingSink
) -> None:
    proxy = proxy_factory(base_config(
        counting_sink.port, server={"max_message_size": 100 * 1024 * 1024}
    ))
    line = b"0123456789" * 7 + b"abcdef\r\n"  # 78 octets, no leading dots: nothing to stuff
    block = line * 13_443  # ~1 MiB
    # Warm up the very same path first, so the baseline includes everything a message
    # needs once (imports, connection objects, buffers) and only per-size growth remains.
    warm_header = b"X-Core-Marker: warmup\r\nSubject: warmup\r\n\r\n"
    assert stream_message(proxy, warm_header, block, 2).code == 250
    counting_sink.wait_for_messages(1)

    marker = f"X-Core-Marker: {uuid.uuid4().hex}\r\n".encode()
    header = marker + b"Subject: sixty megabytes\r\n\r\n"
    blocks = 60
    with RssPeak(proxy.pid) as rss:
        reply = stream_message(proxy, header, block, blocks)
    assert _code(reply) == (250, "2.0.0"), reply
    (_, message) = counting_sink.wait_for_messages(2)

    sent = len(header) + len(block) * blocks
    assert sent > 60_000_000
    offset = message.head.find(marker)
    assert offset > 0, f"marker not found in the first 64 KiB: {message.head[:300]!r}"
    assert message.head[:offset].startswith(b"Received: ")
    assert b"by proxy.test (relayproxy)" in message.head[:offset]
    assert message.length - offset == sent, (
        f"downstream got {message.length - offset} body octets, client sent {sent}")
    assert message.tail == (header + block)[-64:]
    assert rss.growth_mib < 16, (
        f"proxy RSS grew by {rss.growth_mib:.1f} MiB (baseline {rss.baseline} KiB, "
        f"peak {rss.peak} KiB) while streaming {sent} octets"
    )
