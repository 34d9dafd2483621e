"""The rules engine end to end: through the real proxy, to a scripted downstream or the real
Postfix, with a DNS server on loopback for DNSBL and reverse DNS."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.dns import DnsServer
from support.mmdb import place, write_database
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config, check_config, run_cli, toml_dumps
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP, Reply, data_payload
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]


def _rules_proxy(factory: ProxyFactory, tmp_path: Path, downstream_port: int, rules: str,
                 rules_config: dict[str, Any] | None = None, wait_ready: bool = True,
                 **overrides: Any) -> ProxyProcess:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / "test.toml").write_text(textwrap.dedent(rules))
    config = base_config(downstream_port, rules={
        "files": [str(folder / "*.toml")], **(rules_config or {})}, **overrides)
    return factory(config, wait_ready=wait_ready)


def _transaction(proxy: ProxyProcess, helo: str = "client.example.org",
                 sender: str = "s@example.org", rcpts: tuple[str, ...] = ("alice@relay.test",),
                 body: bytes | None = None, all_or_none: bool = False) -> dict[str, Any]:
    """One transaction; returns each reply by stage ("rcpt" is a list). all_or_none: DATA
    only when every recipient was accepted."""
    out: dict[str, Any] = {"rcpt": []}
    with RawSMTP(timeout=20) as client:
        client.connect(proxy.host, proxy.port)
        out["greeting"] = client.greeting
        out["helo"] = client.ehlo(helo)
        out["mail"] = client.cmd(f"MAIL FROM:<{sender}>")
        for rcpt in rcpts:
            out["rcpt"].append(client.cmd(f"RCPT TO:<{rcpt}>"))
        accepted = [r.code == 250 for r in out["rcpt"]]
        if body is not None and (all(accepted) if all_or_none else any(accepted)):
            assert client.cmd("DATA").code == 354
            client.send(data_payload(body))
            out["dot"] = client.read_reply()
        client.cmd("QUIT")
    return out


def _code(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.enhanced


MESSAGE = b"From: a@example.org\r\nDate: Mon, 1 Dec 2026 10:00:00 +0000\r\n" \
          b"Message-ID: <1@example.org>\r\nSubject: hello\r\n\r\nhello\r\n"


# ---------------------------------------------------------------------- stages and deferral


def test_helo_rule_deferred_to_rcpt_and_exempt_recipients_pass(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "helo-claims-to-be-us"
        stage = "helo"
        match.helo = '(?i)^proxy\\.test$'
        reply = "550 5.7.1 You are not me"
    """)
    out = _transaction(proxy, helo="proxy.test",
                       rcpts=("alice@relay.test", "postmaster@relay.test", "abuse@relay.test"),
                       body=MESSAGE)
    assert out["helo"].code == 250 and out["mail"].code == 250  # deferred to RCPT
    assert [(r.code, r.text) for r in out["rcpt"]] == [
        (550, "5.7.1 You are not me"), (250, "2.1.5 Ok"), (250, "2.1.5 Ok")]
    assert out["dot"].code == 250
    (message,) = server.wait_for_messages(1)
    assert b"hello" in message
    assert proxy.metric("relayproxy_rule_hits_total",
                        {"rule": "helo-claims-to-be-us", "action": "reject"}) == 1
    assert proxy.metric("relayproxy_rejections_total",
                        {"stage": "rcpt", "code_class": "5xx", "source": "rule"}) == 1
    (line,) = proxy.wait_for_transactions(1)
    assert line["rules"] == "helo-claims-to-be-us", line


def test_defer_false_answers_at_once(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "no-localhost"
        match.helo = "^localhost$"
        defer = false
    """)
    out = _transaction(proxy, helo="localhost")
    assert _code(out["helo"]) == (550, "5.7.1"), out["helo"]
    assert "no-localhost" in out["helo"].text
    assert out["mail"].code == 503  # no HELO accepted
    assert server.connections == 0, server.describe()


def test_rule_refused_session_opens_no_downstream_connection(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "blocked-sender"
        match.sender = "@spam\\\\.example$"
    """)
    out = _transaction(proxy, sender="x@spam.example", rcpts=("alice@relay.test", "bob@relay.test"))
    assert [_code(r) for r in out["rcpt"]] == [(550, "5.7.1")] * 2
    assert server.connections == 0, server.describe()


def test_connect_reject_without_defer_closes_with_554(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "loopback-banned"
        match.client_ip = "127.0.0.0/8"
        defer = false
    """, wait_ready=False)

    def greeting() -> Reply | None:
        try:
            with RawSMTP() as client:
                client.connect(proxy.host, proxy.port)
                return client.greeting
        except OSError:
            return None  # not listening yet

    reply = wait_until(greeting, "the proxy's first answer", 15)
    assert _code(reply) == (554, "5.7.1"), reply
    assert "loopback-banned" in reply.text
    assert server.connections == 0


# ---------------------------------------------------------------------- scores, accept, monitor


SCORING = """
    [[rule]]
    name = "allow-partner"
    match.sender_domain = ["partner.example"]
    action = "accept"
    scope = "transaction"

    [[rule]]
    name = "no-date"
    match.header_absent = ["Date"]
    action = "score"
    score = 4

    [[rule]]
    name = "no-message-id"
    match.header_absent = ["Message-ID"]
    action = "score"
    score = 4

    [[rule]]
    name = "shouting"
    match.header.subject = "^[A-Z !]+$"
    action = "score"
    score = 3
"""


def test_scores_add_up_and_the_reply_names_the_rules(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, SCORING,
                         rules_config={"reject_score": 10})
    spam = b"From: a@example.org\r\nSubject: WIN NOW!\r\n\r\nx\r\n"
    out = _transaction(proxy, body=spam)
    assert _code(out["dot"]) == (550, "5.7.1"), out["dot"]
    assert "(no-date, no-message-id, shouting)" in out["dot"].text, out["dot"]
    # below the threshold: delivered, the log line carries the score
    out = _transaction(proxy, body=b"From: a@example.org\r\nSubject: Hi\r\n\r\nx\r\n")
    assert out["dot"].code == 250
    lines = proxy.wait_for_transactions(2)
    assert lines[-1]["score"] == "8" and lines[-1]["rules"] == "no-date,no-message-id"
    # allowlisted sender: nothing else is evaluated
    out = _transaction(proxy, sender="ceo@partner.example", body=spam)
    assert out["dot"].code == 250
    assert len(server.messages) == 2


def test_tempfail_score(scripted: ScriptedFactory, proxy_factory: ProxyFactory,
                        tmp_path: Path) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, SCORING,
                         rules_config={"reject_score": 100, "tempfail_score": 7})
    out = _transaction(proxy, body=b"Subject: Hi\r\n\r\nx\r\n")
    assert _code(out["dot"]) == (451, "4.7.1"), out["dot"]
    assert server.messages == []


@pytest.mark.parametrize("where", ["global", "rule"])
def test_monitor_mode_delivers_and_counts(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path, where: str
) -> None:
    server = scripted()
    rule_monitor = "monitor = true" if where == "rule" else ""
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, f"""
        [[rule]]
        name = "everything"
        match.helo = "."
        {rule_monitor}
        [[rule]]
        name = "big-score"
        match.helo = "."
        action = "score"
        score = 50
        {rule_monitor}
    """, rules_config={"mode": "monitor"} if where == "global" else None)
    out = _transaction(proxy, body=MESSAGE)
    assert [r.code for r in out["rcpt"]] == [250] and out["dot"].code == 250
    server.wait_for_messages(1)
    for rule in ("everything", "big-score"):
        assert proxy.metric("relayproxy_rule_hits_total",
                            {"rule": rule, "action": "monitor"}) == 1
    assert proxy.metric("relayproxy_rule_hits_total",
                        {"rule": "everything", "action": "reject"}) == 0
    (line,) = proxy.wait_for_transactions(1)
    assert line["rules"] == "everything(monitor),big-score(monitor)", line
    assert line["monitor_score"] == "50", line


# ---------------------------------------------------------------------- message rules


def test_header_body_and_attachment_rules_refuse_at_end_of_data(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance, tmp_path: Path
) -> None:
    proxy = _rules_proxy(proxy_factory, tmp_path, mailboxes.port, """
        [[rule]]
        name = "phrase"
        match.body = "(?i)claim your prize"
        [[rule]]
        name = "executable"
        match.attachment_name = '(?i)\\.(exe|scr)$'
        reply = "554 5.7.1 Executable attachments are refused"
    """)
    text = base64.encodebytes(b"Hello,\nclaim YOUR prize today\n").replace(b"\n", b"\r\n")
    encoded = (b"Subject: b64\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n" + text)
    out = _transaction(proxy, body=encoded)
    assert _code(out["dot"]) == (550, "5.7.1") and "phrase" in out["dot"].text, out["dot"]
    boundary = uuid.uuid4().hex
    attached = (
        f"Subject: invoice\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
        f"boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\n"
        f"see attached\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--{boundary}--\r\n"
    ).encode()
    out = _transaction(proxy, body=attached)
    assert out["dot"].raw == b"554 5.7.1 Executable attachments are refused\r\n", out["dot"]
    good = _transaction(proxy, body=b"Subject: fine\r\n\r\nnothing to see\r\n")
    assert good["dot"].code == 250
    delivered = mailboxes.wait_for_deliveries(1, user="alice")
    assert len(delivered) == 1 and b"nothing to see" in delivered[0]


def test_add_header_from_an_early_stage_and_at_end_of_data(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "tag-loopback"
        match.client_ip = "127.0.0.0/8"
        action = "add_header"
        header = "X-Policy: loopback client"
        [[rule]]
        name = "tag-big"
        match.size_over = 10
        action = "add_header"
        header = "X-Policy-Size: over 10"
    """)
    assert _transaction(proxy, body=MESSAGE)["dot"].code == 250
    (message,) = server.wait_for_messages(1)
    head = message.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"X-Policy: loopback client\r\n") == 1, head
    assert head.count(b"X-Policy-Size: over 10\r\n") == 1, head


# ---------------------------------------------------------------------- DNS


def test_dnsbl_and_fcrdns(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path,
    dns_server: Callable[..., DnsServer],
) -> None:
    dns = dns_server(a={"1.0.0.127.zen.test": "127.0.0.2",
                        "1.0.0.127.refusing.test": "127.255.255.254"})
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "dnsbl-zen"
        match.dnsbl = { zone = "zen.test", codes = ["127.0.0.2-127.0.0.11"] }
        action = "score"
        score = 6
        [[rule]]
        name = "no-fcrdns"
        match.fcrdns = false
        action = "score"
        score = 5
        [[rule]]
        name = "refusing-zone"
        match.dnsbl = "refusing.test"
        defer = false
    """, server={"reverse_dns": True}, dns={"nameservers": [dns.nameserver], "timeout": 2})
    out = _transaction(proxy)
    (rcpt,) = out["rcpt"]
    assert _code(rcpt) == (550, "5.7.1"), rcpt
    assert "(dnsbl-zen, no-fcrdns)" in rcpt.text, rcpt
    assert out["greeting"].code == 220  # the 127.255.255.254 answer is an error, not a listing
    assert proxy.metric("relayproxy_rule_hits_total",
                        {"rule": "refusing-zone", "action": "reject"}) == 0


def test_dns_failure_skips_or_tempfails_by_rule(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    from support.ports import free_port

    server = scripted()
    dead_dns = f"127.0.0.1:{free_port()}"  # nothing answers there
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "listed-skip"
        match.dnsbl = "zen.test"
        [[rule]]
        name = "listed-tempfail"
        match.dnsbl = "zen.test"
        on_dns_error = "tempfail"
    """, dns={"nameservers": [dead_dns], "timeout": 0.5})
    out = _transaction(proxy)
    (rcpt,) = out["rcpt"]
    assert _code(rcpt) == (451, "4.7.1"), rcpt
    assert "listed-tempfail" in rcpt.text


# ---------------------------------------------------------------------- reload and config


def test_reload_valid_and_broken_rules(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "first"
        match.helo = "^first\\\\.test$"
    """)
    rules_file = tmp_path / "rules" / "test.toml"
    assert _transaction(proxy, helo="first.test")["rcpt"][0].code == 550
    rules_file.write_text('[[rule]]\nname = "second"\nmatch.helo = \'^second\\.test$\'\n')
    proxy.send_signal(signal.SIGHUP)
    wait_until(lambda: _transaction(proxy, helo="second.test")["rcpt"][0].code == 550,
               "the reloaded rule to refuse", 10)
    assert _transaction(proxy, helo="first.test")["rcpt"][0].code == 250
    rules_file.write_text('[[rule]]\nname = "broken"\nmatch.hleo = "x"\n')
    proxy.send_signal(signal.SIGHUP)
    logged = proxy.wait_for_log("reload failed")
    assert "test.toml" in logged and "'broken'" in logged and "hleo" in logged, logged
    assert _transaction(proxy, helo="second.test")["rcpt"][0].code == 550  # old rules run


def test_check_config_validates_rule_files(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[[rule]]\nname = "r"\nstage = "mail"\n'
                                       'match.body = "x"\n')
    result = check_config(base_config(1, rules={"files": [str(tmp_path / "bad.toml")]}))
    assert result.returncode == 2, result
    assert "bad.toml" in result.stderr and "'r'" in result.stderr and "body" in result.stderr


# ---------------------------------------------------------------------- early talker


def test_greet_delay_refuses_early_talkers(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port, server={"greet_delay": 1.0}),
                          wait_ready=False)
    proxy.wait_ready()

    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(b"EHLO impatient.test\r\n")
        reply = sock.recv(1024)
    assert reply.startswith(b"554 5.5.1 "), reply
    with RawSMTP() as client:  # a patient client is greeted after the delay
        client.connect(proxy.host, proxy.port)
        assert client.greeting.code == 220
        assert client.ehlo("patient.test").code == 250
        client.cmd("QUIT")
    assert proxy.metric("relayproxy_protocol_errors_total", {"kind": "pregreet"}) == 1


# ---------------------------------------------------------------------- limits and cache


def test_message_limit_per_client_holds(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[limit]]
        name = "messages-per-client"
        count = "messages"
        per = "client_net"
        max = 2
        window = 3600
    """)
    codes = [_transaction(proxy)["mail"] for _ in range(3)]
    assert [c.code for c in codes] == [250, 250, 451], codes
    assert codes[2].enhanced == "4.7.1"
    assert proxy.metric("relayproxy_rule_hits_total",
                        {"rule": "messages-per-client", "action": "tempfail"}) == 1


def test_dictionary_attack_ends_in_421_and_a_block(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance, tmp_path: Path
) -> None:
    proxy = _rules_proxy(proxy_factory, tmp_path, mailboxes.port, """
        [[limit]]
        name = "dictionary-attack"
        count = "unknown_recipients"
        per = "client_net"
        max = 3
        window = 600
        block_for = 3600
    """)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("attacker.test")
        assert client.cmd("MAIL FROM:<x@example.org>").code == 250
        replies = [client.cmd(f"RCPT TO:<guess{i}@relay.test>") for i in range(4)]
        assert [r.code for r in replies] == [550, 550, 550, 421], replies
        assert replies[0].enhanced == "5.1.1"  # Postfix's own answer
    with RawSMTP() as client:  # the network is refused now
        client.connect(proxy.host, proxy.port)
        assert client.greeting.code == 421, client.greeting


def test_recipient_cache_answers_known_bad_addresses_without_the_downstream(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted({"RCPT": ("550 5.1.1 <nobody@relay.test>: User unknown",
                                "250 2.1.5 Ok", "250 2.1.5 Ok")})
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "nothing"
        match.helo = "^never$"
    """)
    first = _transaction(proxy, rcpts=("nobody@relay.test",))["rcpt"][0]
    second = _transaction(proxy, rcpts=("nobody@relay.test", "alice@relay.test"))["rcpt"]
    assert first.raw == second[0].raw, (first, second)
    assert second[1].code == 250
    rcpts = [c for c in server.all_commands if c.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<nobody@relay.test>", "RCPT TO:<alice@relay.test>"], rcpts


def test_rcpt_rule_refusal_with_postfix_delivers_nothing(
    proxy_factory: ProxyFactory, mailboxes: PostfixInstance, tmp_path: Path
) -> None:
    proxy = _rules_proxy(proxy_factory, tmp_path, mailboxes.port, """
        [[rule]]
        name = "no-mail-for-bob"
        match.recipient = "^bob@"
    """)
    out = _transaction(proxy, rcpts=("bob@relay.test",), body=MESSAGE)
    assert _code(out["rcpt"][0]) == (550, "5.7.1")
    assert "dot" not in out
    out = _transaction(proxy, rcpts=("bob@relay.test", "alice@relay.test"), body=MESSAGE)
    assert out["dot"].code == 250
    assert mailboxes.wait_for_deliveries(1, user="alice")
    assert mailboxes.deliveries(user="bob") == []


# ---------------------------------------------------------------------- test-message


def _test_message(tmp_path: Path, rules: str, message: bytes, *args: str
                  ) -> subprocess.CompletedProcess[str]:
    folder = tmp_path / "tm"
    folder.mkdir(exist_ok=True)
    (folder / "rules.toml").write_text(textwrap.dedent(rules))
    config = folder / "relayproxy.toml"
    config.write_text(toml_dumps(base_config(1, rules={"files": ["rules.toml"]})))
    (folder / "message.eml").write_bytes(message)
    return run_cli("test-message", "-c", str(config), "--client-ip", "192.0.2.7",
                   "--helo", "mx.example.net", "--from", "s@example.net",
                   "--to", "alice@relay.test", *args, str(folder / "message.eml"))


TM_RULES = """
    [[rule]]
    name = "prize"
    match.body = "(?i)prize"
    [[rule]]
    name = "no-date"
    match.header_absent = ["Date"]
    action = "score"
    score = 2
    [[rule]]
    name = "tag"
    match.helo = "example"
    action = "add_header"
    header = "X-Tag: yes"
    [[rule]]
    name = "slow-down"
    match.header.subject = "later"
    action = "tempfail"
"""


def test_test_message_text_json_and_exit_codes(tmp_path: Path) -> None:
    result = _test_message(tmp_path, TM_RULES, b"Subject: hi\n\nyou won a prize\n")
    assert result.returncode == 1, result
    assert "550 5.7.1 Rejected by policy (prize)" in result.stdout
    assert "no-date" in result.stdout and "slow-down" in result.stdout
    result = _test_message(tmp_path, TM_RULES, b"Subject: hi\n\nhello\n", "--json")
    assert result.returncode == 0, result
    out = json.loads(result.stdout)
    assert out["verdict"] == "accept" and out["reply"].startswith("250 ")
    hits = {r["name"]: r["hit"] for r in out["rules"]}
    assert hits == {"tag": True, "prize": False, "no-date": True, "slow-down": False}, hits
    assert out["score"] == 2 and out["added_headers"] == ["X-Tag: yes"]
    result = _test_message(tmp_path, TM_RULES, b"Subject: see you later\n\nhello\n", "--json")
    assert result.returncode == 2, result
    assert json.loads(result.stdout)["reply"].startswith("451 4.7.1")


def test_country_rule_with_a_generated_database(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    write_database(tmp_path / "countries.mmdb", {
        "127.0.0.2/32": {"country": place("KP", 1873107, "North Korea")},
        "127.0.0.3/32": {"country": place("DE", 2921044, "Germany")},
    }, 4)
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "geo-block"
        match.country = ["KP"]
        reply = "550 5.7.1 Not from your region"
    """, rules_config={"country_db": str(tmp_path / "countries.mmdb")})

    def rcpt_from(source: str) -> Reply:
        client = RawSMTP(timeout=10)
        client.sock = socket.create_connection((proxy.host, proxy.port), timeout=10,
                                               source_address=(source, 0))
        with client:
            client.greeting = client.read_reply()
            client.ehlo("geo.test")
            assert client.cmd("MAIL FROM:<s@example.org>").code == 250
            reply = client.cmd("RCPT TO:<alice@relay.test>")
            client.cmd("QUIT")
        return reply

    assert rcpt_from("127.0.0.2").raw == b"550 5.7.1 Not from your region\r\n"
    assert rcpt_from("127.0.0.3").code == 250
    assert rcpt_from("127.0.0.1").code == 250  # not in the database: no country


# ---------------------------------------------------------------------- review regressions


def test_a_later_accept_does_not_undo_a_deferred_refusal(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "listed"
        match.client_ip = "127.0.0.0/8"
        [[rule]]
        name = "partner"
        match.sender_domain = ["partner.example"]
        action = "accept"
    """)
    out = _transaction(proxy, sender="forged@partner.example")  # the sender is forgeable
    assert _code(out["rcpt"][0]) == (550, "5.7.1"), out["rcpt"]
    assert server.connections == 0


def test_accept_scope_session_and_transaction(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "trusted-sender"
        match.sender = "^boss@"
        action = "accept"
        scope = "transaction"
        [[rule]]
        name = "everyone-else"
        match.recipient = "."
    """)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("h.test")
        assert client.cmd("MAIL FROM:<boss@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("RSET").code == 250
        assert client.cmd("MAIL FROM:<other@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 550  # the accept has ended
        client.cmd("QUIT")
    result = check_config(base_config(1, rules={"files": [str(_rules_file(tmp_path, """
        [[rule]]
        name = "early"
        match.helo = "x"
        action = "accept"
        scope = "transaction"
    """))]}))
    assert result.returncode == 2 and "scope" in result.stderr, result.stderr


def _rules_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"extra-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_malformed_encoded_word_does_not_break_the_session(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "subject"
        match.header.subject = "(?i)lottery"
    """)
    out = _transaction(proxy, body=b"Subject: =?utf-8?b?AAAAA?=\r\n\r\nx\r\n")
    assert out["dot"].code == 250, out["dot"]
    server.wait_for_messages(1)


def test_helo_add_header_is_the_last_helo_only_and_deferred_421_is_a_451(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "tag-bad"
        match.helo = "^bad"
        action = "add_header"
        header = "X-Bad-Helo: yes"
        [[rule]]
        name = "slow"
        match.helo = "^slow"
        action = "tempfail"
        reply = "421 4.7.0 Come back later"
    """)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        for _ in range(3):
            client.ehlo("bad.test")
        client.ehlo("good.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(b"Subject: s\r\n\r\nx\r\n"))
        assert client.read_reply().code == 250
        client.ehlo("slow.test")
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        deferred = client.cmd("RCPT TO:<alice@relay.test>")
        assert _code(deferred) == (451, "4.7.0"), deferred  # at RCPT, never a 421
        assert client.cmd("RCPT TO:<postmaster@relay.test>").code == 250  # session goes on
        client.cmd("QUIT")
    (message, *_) = server.wait_for_messages(1)
    assert b"X-Bad-Helo" not in message


def test_monitor_mode_covers_limits_and_no_reverse_dns_is_unknown(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    server = scripted()
    proxy = _rules_proxy(proxy_factory, tmp_path, server.port, """
        [[rule]]
        name = "no-fcrdns"
        match.fcrdns = false
        action = "score"
        score = 3
        [[limit]]
        name = "one-message"
        count = "messages"
        per = "client_net"
        max = 1
        window = 3600
    """, rules_config={"mode": "monitor"})
    codes = [_transaction(proxy)["mail"].code for _ in range(3)]
    assert codes == [250, 250, 250], codes
    assert proxy.metric("relayproxy_rule_hits_total",
                        {"rule": "one-message", "action": "monitor"}) == 2
    # reverse_dns is off in the test config: no-fcrdns is unknown, so it never hits
    assert proxy.metric("relayproxy_rule_hits_total",
                        {"rule": "no-fcrdns", "action": "monitor"}) == 0


def test_greylisting_after_the_downstream_accepted_and_the_retry_passes(
    scripted: ScriptedFactory, proxy_factory: ProxyFactory
) -> None:
    server = scripted()
    proxy = proxy_factory(base_config(server.port, rules={"greylist_delay": 1}))

    def attempt() -> dict[str, Any]:
        # bob's first attempt came a moment after alice's: a retry may pass alice first, and
        # must then not deliver to her alone
        return _transaction(proxy, rcpts=("alice@relay.test", "bob@relay.test"), body=MESSAGE,
                            all_or_none=True)

    first = attempt()
    assert [_code(r) for r in first["rcpt"]] == [(451, "4.7.1")] * 2, first["rcpt"]
    assert "Greylisted" in first["rcpt"][0].text
    assert "dot" not in first
    # the downstream had accepted them: its transaction was started over without them
    commands = server.all_commands
    assert commands.count("RSET") >= 2, commands
    # a retry within the window, after the delay, passes (bounded poll, no fixed sleep)
    def passes() -> dict[str, Any] | None:
        out = attempt()
        return out if all(r.code == 250 for r in out["rcpt"]) else None

    retry = wait_until(passes, "the greylisted retry to pass", 10)
    assert [r.code for r in retry["rcpt"]] == [250, 250] and retry["dot"].code == 250
    server.wait_for_messages(1)
    (tx,) = server.transactions
    assert tx.rcpts == ["RCPT TO:<alice@relay.test>", "RCPT TO:<bob@relay.test>"], tx.rcpts
