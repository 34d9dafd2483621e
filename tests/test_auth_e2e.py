"""Sender authentication end to end: through the real proxy to the real Postfix, with the
tests' own DNS zones (SPF, DKIM keys, _dmarc records) on a loopback dnsmasq."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import dkim
import pytest
from support.authkeys import rsa_key, sign, tamper_body
from support.dns import DnsServer
from support.postfix import PostfixInstance
from support.procstat import RssPeak
from support.proxy import ProxyProcess, base_config, run_cli, toml_dumps
from support.sink import CountingSink, stream_message
from support.smtpclient import send_message

ProxyFactory = Callable[..., ProxyProcess]
RCPT = "alice@relay.test"


def zone_records() -> dict[str, str]:
    return {
        "spf-fail.test": "v=spf1 -all",
        "signer.test": "v=spf1 ip4:127.0.0.1 -all",
        "forwarder.test": "v=spf1 ip4:127.0.0.0/8 -all",
        "reject.test": "v=spf1 ip4:192.0.2.1 -all",
        "_dmarc.reject.test": "v=DMARC1; p=reject",
        "_dmarc.none.test": "v=DMARC1; p=none",
        "_dmarc.signer.test": "v=DMARC1; p=reject; adkim=s",
        "_dmarc.example.co.uk": "v=DMARC1; p=reject; sp=reject",
        "rsa._domainkey.signer.test": rsa_key().record,
        "rsa._domainkey.reject.test": rsa_key().record,
        "arc._domainkey.sealer.test": rsa_key().record,
        "_dmarc.quarantine.test": "v=DMARC1; p=quarantine",
        "spfdmarc.test": "v=spf1 -all",
        "_dmarc.spfdmarc.test": "v=DMARC1; p=none",
        "rsa._domainkey.spfdmarc.test": rsa_key().record,
    }


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = DnsServer(workdir=tmp_path_factory.mktemp("auth-dns"), txt=zone_records(),
                       refused=["timeout.test"])
    server.start()
    yield server
    server.stop()


def auth_proxy(factory: ProxyFactory, zone: DnsServer, port: int, **auth: Any
               ) -> ProxyProcess:
    config = base_config(port, dns={"nameservers": [zone.nameserver], "timeout": 2},
                         auth={"enabled": True, "timeout": 5, **auth})
    return factory(config)


def message(sender: str = "alice@signer.test", subject: str = "auth test",
            extra: bytes = b"") -> bytes:
    head = (f"From: Alice <{sender}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            "Date: Wed, 02 Dec 2026 02:00:00 +0000\r\n"
            f"Message-ID: <{time.monotonic_ns()}@test>\r\n\r\n").encode()
    return extra + head + b"Hello, this is the body.\r\n" * 5


def _ar(delivered: bytes) -> str:
    head = delivered.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
    fields = re.findall(rb"(?ms)^Authentication-Results:.*?(?=^\S)", head + b"\nX: end")
    return "\n".join(f.decode() for f in fields)


def test_spf_fail_refused_at_mail(proxy_factory: ProxyFactory, zone: DnsServer,
                                  mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    out = send_message(proxy.host, proxy.port, "bob@spf-fail.test", [RCPT],
                       message("bob@spf-fail.test"))
    assert out["mail"].code == 550 and out["mail"].enhanced == "5.7.23", out["mail"]
    assert "SPF fail" in out["mail"].text
    (tx,) = proxy.wait_for_transactions(1)
    assert tx["spf"] == "fail"
    assert proxy.metric("relayproxy_auth_results_total", {"method": "spf", "result": "fail"}
                        ) == 1
    assert mailboxes.deliveries() == []


def test_dkim_signed_message_arrives_with_dkim_pass(proxy_factory: ProxyFactory,
                                                    zone: DnsServer,
                                                    mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    forged = b"Authentication-Results: PROXY.test; dkim=pass header.d=signer.test\r\n"
    signed = sign(message(), "rsa", "signer.test", rsa_key())
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], forged + signed)
    assert out["dot"].code == 250, out
    (delivered,) = mailboxes.wait_for_deliveries(1)
    ar = _ar(delivered)
    assert ar.count("Authentication-Results:") == 1, ar  # the forged one is gone
    assert ar.startswith("Authentication-Results: proxy.test;")
    assert "spf=pass smtp.mailfrom=signer.test" in ar
    assert "dkim=pass header.d=signer.test header.s=rsa" in ar
    assert "dmarc=pass" in ar and "header.from=signer.test" in ar
    assert "arc=none" in ar
    # what Postfix stored still verifies: nothing the signature covers was touched
    stored = delivered.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert dkim.verify(stored, dnsfunc=lambda name, timeout=5: rsa_key().record.encode())
    tx = proxy.wait_for_transactions(1)[0]
    assert (tx["spf"], tx["dkim"], tx["dmarc"]) == ("pass", "pass:signer.test", "pass")


def test_tampered_body_gives_dkim_fail_and_dmarc_reject(proxy_factory: ProxyFactory,
                                                        zone: DnsServer,
                                                        mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port, dmarc={"reject": "tag"})
    signed = tamper_body(sign(message(), "rsa", "signer.test", rsa_key()))
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], signed)
    assert out["dot"].code == 250, out
    (delivered,) = mailboxes.wait_for_deliveries(1)
    ar = _ar(delivered)
    assert "dkim=fail (body hash mismatch) header.d=signer.test" in ar, ar
    # SPF passes but strict DKIM alignment is asked for nothing: relaxed SPF alignment holds
    assert "dmarc=pass" in ar


def test_dmarc_reject_without_aligned_pass_is_refused(proxy_factory: ProxyFactory,
                                                      zone: DnsServer,
                                                      mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    # SPF passes for the envelope domain, which is not aligned with the From domain
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("ceo@reject.test"))
    assert out["mail"].code == 250 and out["rcpt"][0].code == 250
    assert (out["dot"].code, out["dot"].enhanced) == (550, "5.7.1"), out["dot"]
    assert "DMARC policy of reject.test" in out["dot"].text
    tx = proxy.wait_for_transactions(1)[0]
    assert tx["dmarc"] == "fail:reject"
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_dmarc_org_domain_under_a_multi_label_suffix(proxy_factory: ProxyFactory,
                                                     zone: DnsServer,
                                                     mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("news@mail.example.co.uk"))
    assert out["dot"].code == 550, out["dot"]
    assert "DMARC policy of mail.example.co.uk" in out["dot"].text


def test_dmarc_none_is_delivered_with_dmarc_fail(proxy_factory: ProxyFactory,
                                                 zone: DnsServer,
                                                 mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("someone@none.test"))
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    assert "dmarc=fail (p=none dis=none) header.from=none.test" in _ar(delivered)


def test_several_from_addresses_refused(proxy_factory: ProxyFactory, zone: DnsServer,
                                        mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    body = message().replace(b"From: Alice <alice@signer.test>",
                             b"From: a@signer.test, b@reject.test")
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], body)
    assert (out["dot"].code, out["dot"].enhanced) == (550, "5.7.1"), out["dot"]
    assert out["dot"].text.endswith("(no single address in From)")
    two = message().replace(b"From: ", b"From: a@signer.test\r\nFrom: ", 1)
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], two)
    assert out["dot"].code == 550 and out["dot"].text.endswith("(2 From fields)"), out["dot"]
    none = message().replace(b"From: Alice <alice@signer.test>\r\n", b"")
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], none)
    assert out["dot"].code == 550 and out["dot"].text.endswith("(no From field)"), out["dot"]
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_arc_sealed_forward_from_trusted_sealer_passes(proxy_factory: ProxyFactory,
                                                      zone: DnsServer,
                                                      mailboxes: PostfixInstance) -> None:
    # reject.test signs; a mailing list at sealer.test adds a footer (DKIM breaks), records
    # what it saw and seals; it then forwards from forwarder.test (SPF not aligned)
    original = sign(message("ceo@reject.test"), "rsa", "reject.test", rsa_key())
    modified = original + b"-- list footer\r\n"
    seen = b"Authentication-Results: sealer.test; dkim=pass header.d=reject.test\r\n"
    arc = dkim.arc_sign(seen + modified, b"arc", b"sealer.test", rsa_key().private,
                        b"sealer.test")
    forwarded = b"".join(arc) + seen + modified
    trusting = auth_proxy(proxy_factory, zone, mailboxes.port,
                          arc={"trusted_sealers": ["sealer.test"]})
    out = send_message(trusting.host, trusting.port, "list@forwarder.test", [RCPT],
                       forwarded)
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    ar = _ar(delivered)
    assert "arc=pass (i=1 d=sealer.test)" in ar and "dmarc=fail" in ar, ar
    assert "dkim=fail" in ar
    assert "dmarc_override=arc:sealer.test" in trusting.wait_for_transactions(1)[0][
        "auth_notes"]
    # without the trust, the domain's policy holds
    strict = auth_proxy(proxy_factory, zone, mailboxes.port)
    out = send_message(strict.host, strict.port, "list@forwarder.test", [RCPT], forwarded)
    assert out["dot"].code == 550, out["dot"]
    # a chain on a message larger than the held window is verified all the same (the body
    # hashes streamed), and the sealer's override applies at the withheld dot
    mailboxes.clear_mailboxes()
    small = proxy_factory(base_config(
        mailboxes.port, server={"hold_bytes": 64},
        dns={"nameservers": [zone.nameserver], "timeout": 2},
        auth={"enabled": True, "timeout": 5, "arc": {"trusted_sealers": ["sealer.test"]}}))
    out = send_message(small.host, small.port, "list@forwarder.test", [RCPT], forwarded)
    assert out["dot"].code == 250, out["dot"]
    tx = small.wait_for_transactions(1)[0]
    assert (tx["arc"], tx["dmarc"]) == ("pass", "fail:reject"), tx
    assert "dmarc_override=arc:sealer.test" in tx["auth_notes"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    ar = _ar(delivered)
    # its header section left before the chain could be verified: no arc= written
    assert "spf=pass" in ar and "arc=" not in ar and "dmarc=" not in ar, ar


def test_dns_failure_gives_temperror_never_a_hang(proxy_factory: ProxyFactory,
                                                  zone: DnsServer,
                                                  mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    started = time.monotonic()
    out = send_message(proxy.host, proxy.port, "bob@timeout.test", [RCPT],
                       message("bob@timeout.test"), timeout=30)
    assert (out["mail"].code, out["mail"].enhanced) == (451, "4.7.24"), out["mail"]
    assert time.monotonic() - started < 25
    assert proxy.wait_for_transactions(1)[0]["spf"] == "temperror"


def test_dns_server_that_never_answers_gives_temperror(proxy_factory: ProxyFactory,
                                                       mailboxes: PostfixInstance) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reads nothing, answers never
    silent.bind(("127.0.0.1", 0))
    try:
        config = base_config(mailboxes.port,
                             dns={"nameservers": [f"127.0.0.1:{silent.getsockname()[1]}"],
                                  "timeout": 1}, auth={"enabled": True, "timeout": 2})
        proxy = proxy_factory(config)
        out = send_message(proxy.host, proxy.port, "bob@signer.test", [RCPT], message(),
                           timeout=30)
        assert (out["mail"].code, out["mail"].enhanced) == (451, "4.7.24"), out["mail"]
    finally:
        silent.close()


def test_fifty_megabyte_signed_message_verifies_with_flat_rss(
        proxy_factory: ProxyFactory, zone: DnsServer, counting_sink: CountingSink) -> None:
    config = base_config(counting_sink.port, server={"max_message_size": 100 * 1024 * 1024},
                         dns={"nameservers": [zone.nameserver], "timeout": 2},
                         auth={"enabled": True, "timeout": 5, "spf": {"fail": "ignore"}})
    proxy = proxy_factory(config)
    line = b"0123456789" * 7 + b"abcdef\r\n"
    block = line * 13_443  # ~1 MiB
    head = (b"From: alice@signer.test\r\nTo: alice@relay.test\r\nSubject: big\r\n\r\n")
    # warm up the same path (imports, buffers), so only per-size growth remains
    warm = sign(head + block, "rsa", "signer.test", rsa_key(), (b"relaxed", b"simple"))
    warm_head, _, _ = warm.partition(b"\r\n\r\n")
    assert stream_message(proxy, warm_head + b"\r\n\r\n", block, 1).code == 250
    blocks = 50
    signed = sign(head + block * blocks, "rsa", "signer.test", rsa_key(),
                  (b"relaxed", b"simple"))
    header = signed[: signed.index(b"\r\n\r\n") + 4]
    del signed
    with RssPeak(proxy.pid) as rss:
        reply = stream_message(proxy, header, block, blocks)
    assert reply.code == 250, reply
    txs = proxy.wait_for_transactions(2)
    assert txs[-1]["dkim"] == "pass:signer.test", txs[-1]
    assert rss.growth_mib < 16, f"proxy RSS grew by {rss.growth_mib:.1f} MiB"


def test_results_are_rule_conditions(proxy_factory: ProxyFactory, zone: DnsServer,
                                     mailboxes: PostfixInstance, tmp_path: Any) -> None:
    rules = tmp_path / "auth.toml"
    rules.write_text(
        '[[rule]]\nname = "unsigned-none"\nmatch.dmarc = "none"\nmatch.dkim = "none"\n'
        'match.spf = "pass"\nmatch.spf_domain = ["forwarder.test"]\n'
        'reply = "550 5.7.1 Unsigned mail from a domain without DMARC"\n'
        '[[rule]]\nname = "signed-ok"\nmatch.dkim_domain = ["signer.test"]\n'
        'match.dmarc_domain = ["signer.test"]\nmatch.arc = "none"\naction = "add_header"\n'
        'header = "X-Signed: signer.test"\n')
    config = base_config(mailboxes.port, dns={"nameservers": [zone.nameserver], "timeout": 2},
                         auth={"enabled": True, "timeout": 5}, rules={"files": [str(rules)]})
    proxy = proxy_factory(config)
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("someone@nodmarc.test"))
    assert out["dot"].code == 550 and "Unsigned mail" in out["dot"].text, out["dot"]
    signed = sign(message(), "rsa", "signer.test", rsa_key())
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], signed)
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    assert b"X-Signed: signer.test" in delivered


def test_test_message_shows_results_and_header(zone: DnsServer, tmp_path: Any) -> None:
    config = tmp_path / "relayproxy.toml"
    config.write_text(toml_dumps(base_config(
        10025, dns={"nameservers": [zone.nameserver], "timeout": 2},
        auth={"enabled": True, "timeout": 5})))
    eml = tmp_path / "m.eml"
    eml.write_bytes(sign(message(), "rsa", "signer.test", rsa_key()))
    done = run_cli("test-message", "-c", str(config), "--client-ip", "127.0.0.1",
                   "--helo", "client.test", "--from", "alice@signer.test", "--to", RCPT,
                   str(eml))
    assert done.returncode == 0, done.stderr
    assert "auth: spf=pass smtp.mailfrom=signer.test" in done.stdout
    assert "auth: dkim=pass header.d=signer.test header.s=rsa" in done.stdout
    assert "added header: Authentication-Results: proxy.test;" in done.stdout, done.stdout


def test_large_message_header_carries_what_is_known_and_dmarc_still_decides(
        proxy_factory: ProxyFactory, zone: DnsServer, mailboxes: PostfixInstance) -> None:
    config = base_config(mailboxes.port, server={"hold_bytes": 1024},
                         dns={"nameservers": [zone.nameserver], "timeout": 2},
                         auth={"enabled": True, "timeout": 5})
    proxy = proxy_factory(config)
    padding = b"more body text that makes the message outgrow the window\r\n" * 100
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT],
                       sign(message() + padding, "rsa", "signer.test", rsa_key()))
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    ar = _ar(delivered)
    # what was known when the header section left: SPF, and no ARC-Seal (arc=none); the
    # signature's result needed the body, DMARC that result: neither was written
    assert "spf=pass smtp.mailfrom=signer.test" in ar and "arc=none" in ar, ar
    assert "dkim=" not in ar and "dmarc=" not in ar
    tx = proxy.wait_for_transactions(1)[0]
    assert (tx["dkim"], tx["dmarc"], tx["arc"]) == ("pass:signer.test", "pass", "none")
    # unsigned: dkim=none is known from the header section too
    mailboxes.clear_mailboxes()
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("someone@nodmarc.test") + padding)
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    ar = _ar(delivered)
    assert "spf=pass" in ar and "dkim=none" in ar and "arc=none" in ar, ar
    assert ar.count("dkim=") == 1 and ar.count("arc=") == 1
    for method in ("dkim", "arc"):  # counted once per message, header or not
        assert proxy.metric("relayproxy_auth_results_total",
                            {"method": method, "result": "none"}) == 1 + (method == "arc")
    # the withheld dot: a DMARC reject still refuses a large message, nothing delivered
    mailboxes.clear_mailboxes()
    forged = message("ceo@reject.test") + b"x" * 70 + b"\r\n" * 1
    forged += (b"padding line to outgrow the held window of this proxy\r\n" * 60)
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT], forged)
    assert (out["dot"].code, out["dot"].enhanced) == (550, "5.7.1"), out["dot"]
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_large_unsigned_message_header_carries_dmarc_when_its_record_is_known(
        proxy_factory: ProxyFactory, dns_server: Callable[..., DnsServer],
        mailboxes: PostfixInstance) -> None:
    # records the resolver may cache: the second message's DMARC record is known at once
    cached = dns_server(txt=zone_records(), ttl=300)
    config = base_config(mailboxes.port, server={"hold_bytes": 1024},
                         dns={"nameservers": [cached.nameserver], "timeout": 2},
                         auth={"enabled": True, "timeout": 5})
    proxy = proxy_factory(config)
    padding = b"more body text that makes the message outgrow the window\r\n" * 100
    for _ in range(2):
        out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT],
                           message() + padding)
        assert out["dot"].code == 250, out["dot"]
    delivered = mailboxes.wait_for_deliveries(2)
    # no signature to verify, SPF known, the record known: DMARC needed no body
    ar = _ar(delivered[-1])
    assert "dkim=none" in ar and "dmarc=pass (p=reject dis=none) header.from=signer.test" in ar
    assert [tx["dmarc"] for tx in proxy.wait_for_transactions(2)] == ["pass", "pass"]
    assert proxy.metric("relayproxy_auth_results_total",
                        {"method": "dmarc", "result": "pass"}) == 2


def test_quarantine_is_tagged(proxy_factory: ProxyFactory, zone: DnsServer,
                              mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("x@quarantine.test"))
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    assert "dmarc=fail (p=quarantine dis=quarantine)" in _ar(delivered)
    assert b"X-Relayproxy-Auth-Warning: dmarc=fail policy=quarantine" in delivered
    refusing = auth_proxy(proxy_factory, zone, mailboxes.port,
                          dmarc={"quarantine": "reject"})
    out = send_message(refusing.host, refusing.port, "list@forwarder.test", [RCPT],
                       message("x@quarantine.test"))
    assert out["dot"].code == 550, out["dot"]


def test_trusted_forwarder_overrides_a_dmarc_reject(proxy_factory: ProxyFactory,
                                                    zone: DnsServer,
                                                    mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port,
                       dmarc={"trusted_forwarders": ["127.0.0.0/8"]})
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("ceo@reject.test"))
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    assert "dmarc=fail (p=reject dis=reject)" in _ar(delivered)
    assert proxy.wait_for_transactions(1)[0]["auth_notes"] == \
        "dmarc_override=trusted_forwarder"


def test_spf_fail_of_a_dmarc_domain_is_left_to_dmarc(proxy_factory: ProxyFactory,
                                                     zone: DnsServer,
                                                     mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    # signed by the domain: DKIM aligned, DMARC passes although SPF fails
    signed = sign(message("a@spfdmarc.test"), "rsa", "spfdmarc.test", rsa_key())
    out = send_message(proxy.host, proxy.port, "a@spfdmarc.test", [RCPT], signed)
    assert out["mail"].code == 250 and out["dot"].code == 250, out
    # unsigned: p=none, delivered with both failures in the header
    out = send_message(proxy.host, proxy.port, "a@spfdmarc.test", [RCPT],
                       message("a@spfdmarc.test"))
    assert out["dot"].code == 250, out
    first, second = sorted(mailboxes.wait_for_deliveries(2), key=lambda m: b"dkim=pass" in m)
    assert "spf=fail" in _ar(first) and "dmarc=fail" in _ar(first)
    assert "spf=fail" in _ar(second) and "dmarc=pass" in _ar(second)


def test_forged_results_removed_others_kept_and_counted(proxy_factory: ProxyFactory,
                                                        zone: DnsServer,
                                                        mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    extra = (b"Authentication-Results: proxy.test (forged);\r\n\tdmarc=pass\r\n"
             b"ARC-Authentication-Results: i=1; proxy.test; dkim=pass\r\n"
             b"Authentication-Results: mx.elsewhere.test; spf=pass\r\n")
    signed = sign(message(), "rsa", "signer.test", rsa_key())
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], extra + signed)
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    assert b"(forged)" not in delivered and b"ARC-Authentication-Results" not in delivered
    assert b"Authentication-Results: mx.elsewhere.test; spf=pass" in delivered
    assert _ar(delivered).count("Authentication-Results: proxy.test;") == 1
    for method in ("spf", "dkim", "dmarc"):
        assert proxy.metric("relayproxy_auth_results_total",
                            {"method": method, "result": "pass"}) == 1, method
    assert proxy.metric("relayproxy_auth_results_total",
                        {"method": "arc", "result": "none"}) == 1


def test_dkim_key_and_dmarc_record_dns_failures(proxy_factory: ProxyFactory, zone: DnsServer,
                                               mailboxes: PostfixInstance) -> None:
    proxy = auth_proxy(proxy_factory, zone, mailboxes.port)
    # the key's DNS fails: dkim=temperror; DMARC still passes by aligned SPF
    signed = sign(message(), "rsa", "timeout.test", rsa_key())
    out = send_message(proxy.host, proxy.port, "alice@signer.test", [RCPT], signed,
                       timeout=30)
    assert out["dot"].code == 250, out["dot"]
    (delivered,) = mailboxes.wait_for_deliveries(1)
    ar = _ar(delivered)
    assert "dkim=temperror (key lookup failed) header.d=timeout.test" in ar, ar
    assert "dmarc=pass" in ar
    # the From domain's DMARC record cannot be had: 451, try later
    out = send_message(proxy.host, proxy.port, "list@forwarder.test", [RCPT],
                       message("x@timeout.test"), timeout=30)
    assert (out["dot"].code, out["dot"].enhanced) == (451, "4.7.1"), out["dot"]
    assert proxy.metric("relayproxy_auth_results_total",
                        {"method": "dmarc", "result": "temperror"}) == 1
