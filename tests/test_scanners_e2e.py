"""Content scanners end to end: the real proxy, the real daemons (clamd, rspamd, spamd from the
Debian packages, private instances on loopback) and the real Postfix downstream."""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.ports import LOOPBACK, free_port
from support.postfix import PostfixInstance
from support.procstat import RssPeak
from support.proxy import ProxyProcess, base_config, run_cli, toml_dumps
from support.scanners import GTUBE, TEST_VIRUS, TEST_VIRUS_NAME, Daemon
from support.sink import CountingSink, stream_message
from support.smtpclient import RawSMTP, Reply, data_payload

ProxyFactory = Callable[..., ProxyProcess]

# complete headers: rspamd scores a bare message as greylist (test-infrastructure-notes.md)
HEAD = (b"From: Sender <s@example.org>\r\nTo: alice@relay.test\r\n"
        b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <scan-%d@example.org>\r\n"
        b"Subject: %s\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
CLEAN_BODY = (b"Hello Alice,\r\n\r\nthe minutes of Tuesday's meeting are below. We agreed to "
              b"meet again next week.\r\n\r\nRegards,\r\nSender\r\n")


def message(body: bytes = CLEAN_BODY, subject: bytes = b"Minutes", n: int = 1) -> bytes:
    return HEAD % (n, subject) + body


def send(proxy: ProxyProcess, data: bytes, timeout: float = 60) -> Reply:
    with RawSMTP(timeout=timeout) as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo("client.example.org")
        assert client.cmd("MAIL FROM:<s@example.org>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(data_payload(data))
        reply = client.read_reply()
        client.cmd("QUIT")
    return reply


def scanners_config(postfix_port: int, **scanners: dict[str, Any]) -> dict[str, Any]:
    return base_config(postfix_port, scanners=scanners)


def clamd_table(daemon: Daemon, **extra: Any) -> dict[str, Any]:
    return {"address": f"{daemon.host}:{daemon.port}", "timeout": 20, **extra}


def spamd_table(daemon: Daemon, **extra: Any) -> dict[str, Any]:
    return {"address": f"{daemon.host}:{daemon.port}", "timeout": 30, **extra}


def rspamd_table(daemon: Daemon, **extra: Any) -> dict[str, Any]:
    return {"url": f"http://{daemon.host}:{daemon.port}", "timeout": 30, **extra}


def assert_nothing_delivered(postfix: PostfixInstance) -> None:
    postfix.wait_queue_empty()
    assert postfix.deliveries() == [], "a refused message was delivered"


def head_of(delivered: bytes) -> str:
    return delivered.partition(b"\n\n")[0].decode("utf-8", "replace")


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never reads or answers."""
    listener = socket.create_server((LOOPBACK, 0), backlog=8)
    yield listener.getsockname()[1]
    listener.close()


# ---------------------------------------------------------------------- clamd


def test_clamd_virus_refused_554_nothing_delivered(
    clamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(mailboxes.port, clamd=clamd_table(clamd)))
    reply = send(proxy, message(b"see the attachment\r\n" + TEST_VIRUS + b"\r\n"))
    assert (reply.code, reply.enhanced) == (554, "5.7.1"), reply
    assert f"Virus found: {TEST_VIRUS_NAME}.UNOFFICIAL" in reply.text, reply
    assert_nothing_delivered(mailboxes)
    (line,) = proxy.wait_for_transactions(1)
    assert (line["clamd"], line["clamd_virus"]) == (
        "infected", f"{TEST_VIRUS_NAME}.UNOFFICIAL"), line
    assert proxy.metric("relayproxy_scanner_verdicts_total",
                        {"scanner": "clamd", "verdict": "infected"}) == 1
    assert proxy.metric("relayproxy_rejections_total",
                        {"stage": "dot", "code_class": "5xx", "source": "scanner"}) == 1
    # a clean message then goes through
    assert send(proxy, message(n=2)).code == 250
    (delivered,) = mailboxes.wait_for_deliveries(1)
    assert CLEAN_BODY.replace(b"\r\n", b"\n") in delivered
    assert proxy.metric("relayproxy_scanner_verdicts_total",
                        {"scanner": "clamd", "verdict": "clean"}) == 1


def test_clamd_100_mb_streams_with_flat_proxy_rss(
    clamd: Daemon, counting_sink: CountingSink, proxy_factory: ProxyFactory
) -> None:
    size_limit = 150 * 1024 * 1024
    proxy = proxy_factory(base_config(
        counting_sink.port, server={"max_message_size": size_limit},
        downstream={"data_timeout": 120},
        scanners={"clamd": clamd_table(clamd, max_bytes=size_limit, timeout=120)}))
    line = b"z" * 958 + b"\r\n"
    block = line * 1093  # ~1 MiB
    assert stream_message(proxy, b"Subject: warm\r\n\r\n", block, 2).code == 250
    counting_sink.wait_for_messages(1)
    with RssPeak(proxy.pid) as rss:
        reply = stream_message(proxy, b"Subject: hundred\r\n\r\n", block, 100)
    assert reply.code == 250, reply
    (_, big) = counting_sink.wait_for_messages(2)
    assert big.length > 100 * 1024 * 1024
    assert rss.growth_mib < 16, (
        f"proxy RSS grew by {rss.growth_mib:.1f} MiB (baseline {rss.baseline} KiB, "
        f"peak {rss.peak} KiB)")
    lines = proxy.wait_for_transactions(2)
    assert lines[-1]["clamd"] == "clean", lines[-1]  # scanned whole, not skipped
    assert proxy.metric("relayproxy_scanner_errors_total",
                        {"scanner": "clamd", "kind": "too_big"}) == 0


def test_clamd_past_max_bytes_scans_the_first_part_and_says_so(
    clamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(mailboxes.port,
                                          clamd=clamd_table(clamd, max_bytes=4096)))
    filler = b"x" * 70 + b"\r\n"
    # a virus in the first 4 KiB refuses the message all the same
    assert send(proxy, message(TEST_VIRUS + b"\r\n" + filler * 200)).code == 554
    # one past the limit is not scanned: delivered, logged and counted, never silent
    assert send(proxy, message(filler * 200 + TEST_VIRUS + b"\r\n", n=2)).code == 250
    mailboxes.wait_for_deliveries(1)
    lines = proxy.wait_for_transactions(2)
    assert (lines[1]["clamd"], lines[1]["clamd_error"]) == ("skipped", "too_big"), lines[1]
    assert proxy.metric("relayproxy_scanner_errors_total",
                        {"scanner": "clamd", "kind": "too_big"}) == 2
    proxy.wait_for_log("over scanners.clamd.max_bytes")


# ---------------------------------------------------------------------- rspamd


def test_rspamd_gtube_refused_with_rspamds_message(
    rspamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(mailboxes.port, rspamd=rspamd_table(rspamd)))
    reply = send(proxy, message(GTUBE + b"\r\n"))
    assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
    assert "Gtube pattern" in reply.text, reply  # rspamd's smtp_message
    assert_nothing_delivered(mailboxes)
    (line,) = proxy.wait_for_transactions(1)
    assert line["rspamd"] == "reject" and "GTUBE" in line["rspamd_symbols"], line
    assert float(line["rspamd_score"]) >= 15
    assert proxy.metric("relayproxy_scanner_verdicts_total",
                        {"scanner": "rspamd", "verdict": "reject"}) == 1


def test_rspamd_clean_message_arrives_with_rspamds_headers(
    rspamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(mailboxes.port, rspamd=rspamd_table(rspamd)))
    forged = b"X-Spamd-Result: default: False [-100 / 15.00]\r\n"
    assert send(proxy, forged + message()).code == 250
    (delivered,) = mailboxes.wait_for_deliveries(1)
    head = head_of(delivered)
    # the fields rspamd's milter_headers module asks for (the tests' rspamd: x-spamd-result,
    # x-rspamd-server), its own result replacing the forged one
    assert "X-Rspamd-Server:" in head, head
    assert head.count("X-Spamd-Result:") == 1 and "[-100 / 15.00]" not in head, head
    assert "MIME_GOOD" in head, head  # the envelope facts went as request headers too:
    (line,) = proxy.wait_for_transactions(1)
    assert line["rspamd"] == "clean", line
    assert "FROM_EQ_ENVFROM" in line["rspamd_symbols"], line  # From header = MAIL FROM
    assert "X-Spam: Yes" not in head


def test_rspamd_message_larger_than_the_held_window_is_scanned_without_fields(
    rspamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    # 300 KB: past server.hold_bytes, the header section leaves before rspamd answers; the
    # message is still scanned (streamed to rspamd whole), and its fields are not written
    filler = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 3 + b"\r\n") * 1800
    proxy = proxy_factory(scanners_config(mailboxes.port, rspamd=rspamd_table(rspamd)))
    assert send(proxy, message(filler)).code == 250
    (delivered,) = mailboxes.wait_for_deliveries(1)
    assert "X-Spamd-Result" not in head_of(delivered)
    assert delivered.count(b"Lorem ipsum") == 3 * 1800
    (line,) = proxy.wait_for_transactions(1)
    assert (line["rspamd"], line["rspamd_headers"]) == ("clean", "too_late"), line
    assert "MIME_GOOD" in line["rspamd_symbols"], line


# ---------------------------------------------------------------------- spamd


def test_spamd_gtube_refused_550(
    spamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(mailboxes.port, spamd=spamd_table(spamd)))
    reply = send(proxy, message(GTUBE + b"\r\n"))
    assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
    assert "spamd" in reply.text
    assert_nothing_delivered(mailboxes)
    (line,) = proxy.wait_for_transactions(1)
    assert line["spamd"] == "spam" and float(line["spamd_score"]) >= 1000, line
    assert "GTUBE" in line["spamd_symbols"]
    assert proxy.metric("relayproxy_scanner_verdicts_total",
                        {"scanner": "spamd", "verdict": "spam"}) == 1


def test_spamd_tag_adds_x_spam_fields(
    spamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(mailboxes.port,
                                          spamd=spamd_table(spamd, action="tag")))
    assert send(proxy, message(GTUBE + b"\r\n")).code == 250
    (delivered,) = mailboxes.wait_for_deliveries(1)
    head = head_of(delivered)
    assert "X-Spam-Flag: YES" in head and "GTUBE" in head, head
    assert "X-Spam-Status: Yes, score=" in head


def test_spamd_over_max_bytes_not_scanned_logged_and_counted(
    spamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(mailboxes.port,
                                          spamd=spamd_table(spamd, max_bytes=2000)))
    big_spam = message(GTUBE + b"\r\n" + (b"y" * 98 + b"\r\n") * 30)
    assert len(big_spam) > 2000
    assert send(proxy, big_spam).code == 250  # not scanned: delivered, never silently
    mailboxes.wait_for_deliveries(1)
    (line,) = proxy.wait_for_transactions(1)
    assert (line["spamd"], line["spamd_error"]) == ("skipped", "too_big"), line
    assert proxy.metric("relayproxy_scanner_errors_total",
                        {"scanner": "spamd", "kind": "too_big"}) == 1
    assert proxy.metric("relayproxy_scanner_verdicts_total",
                        {"scanner": "spamd", "verdict": "skipped"}) == 1
    proxy.wait_for_log("over scanners.spamd.max_bytes (2000)")


# ---------------------------------------------------------------------- failures


def _dead_table(scanner: str, port: int, **extra: Any) -> dict[str, Any]:
    if scanner == "rspamd":
        return {"url": f"http://{LOOPBACK}:{port}", **extra}
    return {"address": f"{LOOPBACK}:{port}", **extra}


@pytest.mark.parametrize("scanner", ["clamd", "rspamd", "spamd"])
def test_stopped_scanner_tempfails_or_accepts_per_on_error(
    scanner: str, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    closed = free_port()  # nothing listens there: a stopped daemon
    proxy = proxy_factory(scanners_config(mailboxes.port,
                                          **{scanner: _dead_table(scanner, closed)}))
    reply = send(proxy, message())
    assert (reply.code, reply.enhanced) == (451, "4.7.1"), reply
    assert scanner in reply.text
    assert_nothing_delivered(mailboxes)
    assert proxy.metric("relayproxy_scanner_errors_total",
                        {"scanner": scanner, "kind": "connect"}) == 1
    (line,) = proxy.wait_for_transactions(1)
    assert (line[scanner], line[f"{scanner}_error"]) == ("error", "connect"), line

    accepting = proxy_factory(scanners_config(
        mailboxes.port, **{scanner: _dead_table(scanner, closed, on_error="accept")}))
    assert send(accepting, message(n=2)).code == 250
    mailboxes.wait_for_deliveries(1)
    (line,) = accepting.wait_for_transactions(1)
    assert (line[scanner], line[f"{scanner}_error"]) == ("skipped", "connect"), line


@pytest.mark.parametrize("scanner", ["clamd", "rspamd", "spamd"])
def test_silent_scanner_times_out_to_451_not_a_hang(
    scanner: str, hung_port: int, mailboxes: PostfixInstance, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(scanners_config(
        mailboxes.port, **{scanner: _dead_table(scanner, hung_port, timeout=1)}))
    reply = send(proxy, message(), timeout=20)  # bounded: a hang fails here
    assert (reply.code, reply.enhanced) == (451, "4.7.1"), reply
    assert_nothing_delivered(mailboxes)
    assert proxy.metric("relayproxy_scanner_errors_total",
                        {"scanner": scanner, "kind": "timeout"}) == 1


# ---------------------------------------------------------------------- rules and test-message


def test_rules_read_scanner_scores_and_symbols(
    rspamd: Daemon, spamd: Daemon, mailboxes: PostfixInstance, proxy_factory: ProxyFactory,
    tmp_path: Path
) -> None:
    rules = tmp_path / "scanners.toml"
    rules.write_text(textwrap.dedent("""
        [[rule]]
        name = "rspamd-says-mime-good"
        match.rspamd_symbol = ["MIME_GOOD", "NO_SUCH_SYMBOL"]
        action = "score"
        score = 4

        [[rule]]
        name = "spamd-unsure"
        match.spamd_score_over = -50
        action = "score"
        score = 3

        [[rule]]
        name = "rspamd-over-100"
        match.rspamd_score_over = 100
    """))
    proxy = proxy_factory(base_config(
        mailboxes.port, rules={"files": [str(rules)], "reject_score": 7},
        scanners={"rspamd": rspamd_table(rspamd), "spamd": spamd_table(spamd, action="tag")}))
    reply = send(proxy, message())
    assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
    assert "rspamd-says-mime-good" in reply.text and "spamd-unsure" in reply.text, reply
    (line,) = proxy.wait_for_transactions(1)
    assert line["rules"] == "rspamd-says-mime-good,spamd-unsure", line
    assert line["score"] == "7", line
    assert_nothing_delivered(mailboxes)


def test_test_message_runs_the_scanners(
    clamd: Daemon, rspamd: Daemon, spamd: Daemon, tmp_path: Path
) -> None:
    config = tmp_path / "relayproxy.toml"
    config.write_text(toml_dumps({"server": {"reverse_dns": False, "hostname": "proxy.test",
                                             "accept_domains": ["relay.test"]},
                                  "scanners": {"clamd": clamd_table(clamd),
                                               "rspamd": rspamd_table(rspamd),
                                               "spamd": spamd_table(spamd)}}))
    eml = tmp_path / "virus.eml"
    eml.write_bytes(message(TEST_VIRUS + b"\r\n"))
    args = ("test-message", "-c", str(config), "--client-ip", "192.0.2.7", "--helo",
            "mx.example.net", "--from", "s@example.org", "--to", "alice@relay.test", "--json")
    result = run_cli(*args, str(eml), timeout=60)
    assert result.returncode == 1, result.stderr
    out = json.loads(result.stdout)
    assert out["reply"].startswith("554 5.7.1 Virus found"), out
    assert out["scanners"]["clamd"] == "infected", out
    # rspamd's word on an unknown 192.0.2.7 without Received fields varies with its rules
    assert out["scanners"]["rspamd"] in ("clean", "add_header"), out
    assert float(out["scanners"]["rspamd_score"]) < 15, out
    assert out["scanners"]["spamd"] == "clean", out

    eml.write_bytes(message(GTUBE + b"\r\n"))
    result = run_cli(*args, str(eml), timeout=60)
    assert result.returncode == 1, result.stderr
    out = json.loads(result.stdout)
    assert out["reply"].startswith("550 5.7.1"), out
    assert (out["scanners"]["rspamd"], out["scanners"]["spamd"]) == ("reject", "spam"), out


def test_test_message_tempfails_when_a_scanner_is_down(tmp_path: Path) -> None:
    config = tmp_path / "relayproxy.toml"
    config.write_text(toml_dumps({
        "server": {"reverse_dns": False, "hostname": "proxy.test",
                   "accept_domains": ["relay.test"]},
        "scanners": {"spamd": {"address": f"{LOOPBACK}:{free_port()}", "timeout": 2}}}))
    eml = tmp_path / "clean.eml"
    eml.write_bytes(message())
    result = run_cli("test-message", "-c", str(config), "--client-ip", "192.0.2.7", "--helo",
                     "mx.example.net", "--from", "s@example.org", "--to", "alice@relay.test",
                     "--json", str(eml), timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    out = json.loads(result.stdout)
    assert out["reply"].startswith("451 4.7.1 Temporary failure in content scanning (spamd)"), out
    assert (out["scanners"]["spamd"], out["scanners"]["spamd_error"]) == ("error", "connect")
