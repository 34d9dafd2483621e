"""Tests of the test infrastructure itself; none of them needs the proxy."""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Callable

import dns.rcode
import dns.resolver
import dns.reversename
import pytest
from support.dns import DnsServer
from support.postfix import PostfixInstance
from support.proxy import base_config, parse_logfmt, toml_dumps
from support.scripted import DROP, STALL, ScriptedDownstream, dot_unstuff
from support.smtpclient import ConnectionClosed, RawSMTP, dot_stuff, send_message

ScriptedFactory = Callable[..., ScriptedDownstream]


def _message(subject: str, body: str = "Hello.") -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@relay.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4()}@example.org>\r\n\r\n{body}\r\n"
    ).encode()


# ---------------------------------------------------------------------- private Postfix


def test_postfix_delivers_to_maildir(mailboxes: PostfixInstance) -> None:
    marker = uuid.uuid4().hex
    replies = send_message(
        mailboxes.host,
        mailboxes.port,
        "sender@example.org",
        ["alice@relay.test"],
        _message(marker, ".leading dot line\r\nend"),
    )
    assert replies["greeting"].code == 220
    assert replies["greeting"].text.startswith("postfix.test ESMTP")
    assert replies["mail"].code == 250
    assert [r.code for r in replies["rcpt"]] == [250]
    assert replies["dot"].code == 250, replies["dot"]

    delivered = mailboxes.wait_for_deliveries(1, user="alice")
    assert len(delivered) == 1
    assert f"Subject: {marker}".encode() in delivered[0]
    # Postfix undid the dot-stuffing that send_message applied.
    assert b"\n.leading dot line\n" in delivered[0]
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries("bob") == []


def test_postfix_rejects_unknown_user_and_relaying(mailboxes: PostfixInstance) -> None:
    with RawSMTP() as client:
        client.connect(mailboxes.host, mailboxes.port)
        assert client.ehlo("client.test").code == 250
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        unknown = client.cmd("RCPT TO:<nobody@relay.test>")
        assert (unknown.code, unknown.enhanced) == (550, "5.1.1"), unknown
        foreign = client.cmd("RCPT TO:<someone@elsewhere.example>")
        assert (foreign.code, foreign.enhanced) == (554, "5.7.1"), foreign
        assert client.cmd("DATA").code == 554
        assert client.cmd("QUIT").code == 221
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_postfix_xclient_from_loopback(mailboxes: PostfixInstance) -> None:
    with RawSMTP() as client:
        client.connect(mailboxes.host, mailboxes.port)
        client.ehlo("proxy.test")
        assert "XCLIENT" in client.extensions
        assert "ADDR" in client.extensions["XCLIENT"].split()
        assert {"PIPELINING", "SMTPUTF8", "8BITMIME"} <= client.extensions.keys()
        assert client.extensions["SIZE"] == "200000000"

        reply = client.cmd("XCLIENT ADDR=192.0.2.10 NAME=client.example.org HELO=client")
        # A successful XCLIENT restarts the session with a new greeting.
        assert reply.code == 220, reply
        assert client.ehlo("client").code == 250
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<carol@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(_message("xclient") + b".\r\n")
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (message,) = mailboxes.wait_for_deliveries(1, user="carol")
    assert b"from client (client.example.org [192.0.2.10])" in message


def test_postfix_accepts_bare_lf_smuggling(mailboxes: PostfixInstance) -> None:
    """Postfix 3.7 keeps smtpd_forbid_bare_newline=no, so "<LF>.<LF>" ends DATA and the rest
    becomes a second, smuggled transaction. The proxy's defence is tested against exactly
    this downstream, so prove the downstream really is vulnerable."""
    smuggled = (
        b"Subject: outer\r\n\r\nouter body\n.\n"
        b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@relay.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n"
    )
    with RawSMTP() as client:
        client.connect(mailboxes.host, mailboxes.port)
        client.ehlo("client.test")
        assert client.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(smuggled)
        codes = [client.read_reply().code for _ in range(4)]
        assert codes == [250, 250, 250, 354]
        assert client.read_reply().code == 250
        client.cmd("QUIT")
    (smuggled_message,) = mailboxes.wait_for_deliveries(1, user="bob")
    assert b"Subject: smuggled" in smuggled_message
    assert b"evil@example.org" in smuggled_message
    assert len(mailboxes.wait_for_deliveries(1, user="alice")) == 1


# ---------------------------------------------------------------------- scripted server


def test_scripted_well_behaved_by_default(scripted: ScriptedFactory) -> None:
    server = scripted()
    body = b"Subject: hi\r\n\r\n.dot line\r\nlast line\r\n"
    replies = send_message(server.host, server.port, "a@example.org", ["b@relay.test"], body)
    assert replies["greeting"].text == "scripted.test ESMTP"
    assert {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} == set(
        replies["ehlo"].extensions
    )
    assert (replies["dot"].code, replies["dot"].enhanced) == (250, "2.0.0")
    assert replies["quit"].code == 221
    (transaction,) = server.transactions
    assert transaction.raw == dot_stuff(body)
    assert transaction.content == body
    assert transaction.mail_from == "MAIL FROM:<a@example.org>"
    assert transaction.rcpts == ["RCPT TO:<b@relay.test>"]
    assert server.messages == [dot_stuff(body)]
    assert server.commands == [
        ["EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<b@relay.test>", "DATA",
         "QUIT"]
    ]
    server.wait_for_closed(1)
    assert server.connection_records[0].closed_by == "server"
    assert server.dot_received
    assert server.partial_bodies == []


def test_scripted_451_at_mail(scripted: ScriptedFactory) -> None:
    server = scripted({"MAIL": "451 4.3.0 Try again later"})
    with RawSMTP() as client:
        client.connect(server.host, server.port)
        client.ehlo("client.test")
        reply = client.cmd("MAIL FROM:<a@example.org>")
        assert (reply.code, reply.enhanced, reply.text) == (451, "4.3.0", "4.3.0 Try again later")
        # The failed MAIL opened no transaction, so the default sequencing applies.
        assert client.cmd("RCPT TO:<b@relay.test>").code == 503
    assert server.all_commands[:2] == ["EHLO client.test", "MAIL FROM:<a@example.org>"]


def test_scripted_stall_at_rcpt(scripted: ScriptedFactory) -> None:
    server = scripted({"RCPT": STALL})
    with RawSMTP(timeout=1.0) as client:
        client.connect(server.host, server.port)
        client.ehlo("client.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        with pytest.raises(TimeoutError):
            client.cmd("RCPT TO:<b@relay.test>")
        # Stalled, not closed: later input is recorded but never answered.
        client.send(b"NOOP\r\n")
        server.wait_for_command("NOOP")
        assert not client.closed_by_peer(timeout=0.3)
    server.wait_for_closed(1)
    assert server.connection_records[0].closed_by == "peer"


def test_scripted_drop_during_body(scripted: ScriptedFactory) -> None:
    server = scripted({"BODY": DROP})
    sent = b"Subject: partial\r\n\r\nfirst line\r\n"
    with RawSMTP() as client:
        client.connect(server.host, server.port)
        client.ehlo("client.test")
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<b@relay.test>")
        assert client.cmd("DATA").code == 354
        client.send(sent)
        assert client.closed_by_peer(timeout=5)
    (partial,) = server.wait_for_partial(1)
    assert partial
    assert sent.startswith(partial)
    assert server.messages == []
    assert not server.dot_received
    assert server.connection_records[0].closed_by == "server"


def test_scripted_rcpt_sequence_multiline_and_drop(scripted: ScriptedFactory) -> None:
    server = scripted(
        {
            "RCPT": ("250 2.1.5 Ok", "550 5.1.1 No such user", "452 4.5.3 Too many"),
            "DOT": ["250-2.0.0 first line", "250 2.0.0 second line"],
            "QUIT": DROP,
        }
    )
    with RawSMTP() as client:
        client.connect(server.host, server.port)
        client.ehlo("client.test")
        client.cmd("MAIL FROM:<>")
        codes = [client.cmd(f"RCPT TO:<u{i}@relay.test>").code for i in range(4)]
        assert codes == [250, 550, 452, 452]
        assert client.cmd("DATA").code == 354
        client.send(b"x\r\n.\r\n")
        dot = client.read_reply()
        assert dot.lines == ["2.0.0 first line", "2.0.0 second line"]
        assert dot.raw == b"250-2.0.0 first line\r\n250 2.0.0 second line\r\n"
        client.send(b"QUIT\r\n")
        with pytest.raises(ConnectionClosed):
            client.read_reply()
    (transaction,) = server.transactions
    assert transaction.rcpts == ["RCPT TO:<u0@relay.test>"]


def test_scripted_end_of_data_is_strictly_crlf_dot_crlf(scripted: ScriptedFactory) -> None:
    server = scripted()
    with RawSMTP() as client:
        client.connect(server.host, server.port)
        client.ehlo("client.test")
        for body in (b"a\n.\nb\r.\r\nc\r\n.\r\n", b".\r\n"):
            client.cmd("MAIL FROM:<a@example.org>")
            client.cmd("RCPT TO:<b@relay.test>")
            assert client.cmd("DATA").code == 354
            client.send(body)
            assert client.read_reply().code == 250
        # Pipelined commands after the dot are handled once the message is complete.
        client.send(b"RSET\r\nNOOP\r\n")
        assert [client.read_reply().code, client.read_reply().code] == [250, 250]
    # Bare LF and bare CR dots are message content, not the end of data.
    assert server.messages == [b"a\n.\nb\r.\r\nc\r\n", b""]


def test_dot_unstuff_inverts_dot_stuff() -> None:
    body = b".a\r\n..b\r\nc.\r\n.\r\n"
    assert dot_unstuff(dot_stuff(body)) == body


# ---------------------------------------------------------------------- dnsmasq


def test_dnsmasq_answers_configured_records(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server(
        ptr={"127.0.0.2": "client.example.org"},
        a={"client.example.org": "127.0.0.3"},
        txt={"txt.example.org": "v=spf1 -all"},
    )
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = 3

    ptr = resolver.resolve(dns.reversename.from_address("127.0.0.2"), "PTR")
    assert [r.to_text() for r in ptr] == ["client.example.org."]
    # An A record must not invent a PTR for its address.
    assert server.query("3.0.0.127.in-addr.arpa", "PTR").rcode() == dns.rcode.NXDOMAIN
    assert [r.to_text() for r in resolver.resolve("client.example.org", "A")] == ["127.0.0.3"]
    assert [r.to_text() for r in resolver.resolve("txt.example.org", "TXT")] == [
        '"v=spf1 -all"'
    ]
    assert server.query("unknown.example.net", "A").rcode() == dns.rcode.NXDOMAIN
    assert server.nameserver == f"127.0.0.1:{server.port}"


# ---------------------------------------------------------------------- proxy helpers


def test_toml_writer_round_trips() -> None:
    config = base_config([2525, 2526], server={"max_recipients": 3, "hostname": 'q"\\\n'})
    config["tls"] = {}
    config["x"] = {"f": 1.5, "b": True, "nested": {"k": ["a", "b"]}}
    assert tomllib.loads(toml_dumps(config)) == config
    assert config["server"]["max_recipients"] == 3
    assert config["server"]["reverse_dns"] is False
    assert config["downstream"]["servers"] == ["127.0.0.1:2525", "127.0.0.1:2526"]


def test_parse_logfmt() -> None:
    line = 'ts=1 event=transaction from="a b\\"c" rcpts=2 empty='
    assert parse_logfmt(line) == {
        "ts": "1", "event": "transaction", "from": 'a b"c', "rcpts": "2", "empty": ""
    }
