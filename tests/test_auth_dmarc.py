"""DMARC (relayproxy.auth.dmarc): records, the organizational domain, alignment, p/sp/pct,
the From field; and the Authentication-Results field and forged ones (relayproxy.auth.results).
"""

from __future__ import annotations

import asyncio
import email.utils
import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.dns import DnsServer

from relayproxy.auth import check as check_module
from relayproxy.auth import results as results_module
from relayproxy.auth.arc import ARCResult
from relayproxy.auth.dkim import DKIMResult
from relayproxy.auth.dmarc import (
    Record,
    aligned,
    cached_record,
    evaluate,
    find_record,
    from_domain,
    from_field_domain,
    org_domain,
    parse_record,
)
from relayproxy.auth.lookup import TempDNSError
from relayproxy.auth.results import AuthResults, aar_authserv_id, authserv_id
from relayproxy.auth.spf import SPFResult
from relayproxy.config import AuthConfig, DNSConfig, HostPort
from relayproxy.dns import make_resolver
from relayproxy.headers import HeaderSection

RECORDS = {
    "_dmarc.example.test": "v=DMARC1; p=reject; sp=quarantine; adkim=s",
    "_dmarc.example.co.uk": "v=DMARC1; p=quarantine",
    "_dmarc.none.test": "v=DMARC1; p=none",
    "_dmarc.two.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    "_dmarc.notdmarc.test": "v=spf1 -all",
}


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = DnsServer(workdir=tmp_path_factory.mktemp("dmarc-dns"), txt=RECORDS,
                       refused=["timeout.test"])
    server.start()
    yield server
    server.stop()


def lookup(zone: DnsServer, domain: str) -> Record | None:
    resolver = make_resolver(DNSConfig(nameservers=(HostPort(zone.host, zone.port),),
                                       timeout=1.0))
    return asyncio.run(asyncio.wait_for(find_record(resolver, domain), 10))


def test_organizational_domains_from_the_public_suffix_list() -> None:
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("mail.example.com") == "example.com"
    assert org_domain("example.com") == "example.com"
    assert org_domain("x.y.example.test") == "example.test"  # unknown TLD: "*" rule


def test_alignment_relaxed_and_strict() -> None:
    assert aligned("mail.example.co.uk", "example.co.uk", strict=False)
    assert not aligned("mail.example.co.uk", "example.co.uk", strict=True)
    assert not aligned("other.co.uk", "example.co.uk", strict=False)
    assert aligned("Example.COM.", "example.com", strict=True)


def test_record_found_at_the_domain_and_at_its_organizational_domain(zone: DnsServer) -> None:
    own = lookup(zone, "example.test")
    assert own is not None and (own.policy, own.strict_dkim, own.domain) == (
        "reject", True, "example.test")
    sub = lookup(zone, "mail.example.test")
    assert sub is not None and (sub.policy, sub.domain) == ("quarantine", "example.test")
    uk = lookup(zone, "news.mail.example.co.uk")
    assert uk is not None and (uk.policy, uk.domain) == ("quarantine", "example.co.uk")
    assert lookup(zone, "none.test") is not None
    assert lookup(zone, "two.test") is None  # several records: no policy
    assert lookup(zone, "notdmarc.test") is None
    assert lookup(zone, "nothing.test") is None
    with pytest.raises(TempDNSError):
        lookup(zone, "timeout.test")


def test_parse_record_policies() -> None:
    assert parse_record(b"v=DMARC1; p=reject; pct=20", False, "d") == Record(
        "reject", 20, False, False, "d")
    assert parse_record(b"v=DMARC1; p=bogus", False, "d") is None
    assert parse_record(b"v=DMARC1; p=bogus; rua=mailto:x@d", False, "d") is not None
    assert parse_record(b"v=DMARC2; p=reject", False, "d") is None


REJECT = Record("reject", 100, False, False, "example.test")


def test_evaluate_pass_by_aligned_spf_or_dkim() -> None:
    assert evaluate(REJECT, "example.test", ("pass", "bounce.example.test"), []).result == \
        "pass"
    assert evaluate(REJECT, "example.test", ("fail", "example.test"),
                    [("pass", "example.test")]).result == "pass"
    failed = evaluate(REJECT, "example.test", ("pass", "other.test"),
                      [("pass", "other.test"), ("fail", "example.test")])
    assert (failed.result, failed.policy) == ("fail", "reject")
    strict = Record("reject", 100, True, True, "example.test")
    assert evaluate(strict, "example.test", ("pass", "bounce.example.test"),
                    [("pass", "sub.example.test")]).result == "fail"
    assert evaluate(None, "example.test", None, []).result == "none"


def test_evaluate_temperror_of_an_aligned_identity() -> None:
    assert evaluate(REJECT, "example.test", ("temperror", "example.test"), []).result == \
        "temperror"
    assert evaluate(REJECT, "example.test", ("fail", "other.test"),
                    [("temperror", "example.test")]).result == "temperror"


def test_pct_applies_the_next_policy_down_outside_the_sample() -> None:
    sampled = Record("reject", 30, False, False, "example.test")
    assert evaluate(sampled, "example.test", None, [], sample=0.1).policy == "reject"
    assert evaluate(sampled, "example.test", None, [], sample=0.5).policy == "quarantine"
    quarantine = Record("quarantine", 0, False, False, "example.test")
    assert evaluate(quarantine, "example.test", None, [], sample=0.0).policy == "none"


def test_from_domain_needs_exactly_one_address() -> None:
    assert from_domain(["Alice <alice@Example.TEST>"]) == "example.test"
    assert from_domain(["a@x.test, b@y.test"]) is None
    assert from_domain(["a@x.test", "b@x.test"]) is None
    assert from_domain([]) is None
    assert from_domain(["undisclosed-recipients:;"]) is None


def test_authserv_ids() -> None:
    assert authserv_id("mx.example.org; spf=pass") == "mx.example.org"
    assert authserv_id(" (comment) MX.Example.ORG 1; none") == "mx.example.org"
    assert aar_authserv_id("i=2; mx.example.org; dkim=pass") == "mx.example.org"


def test_field_carries_only_what_was_computed() -> None:
    results = AuthResults(spf=SPFResult("pass", "example.test", "mailfrom"))
    assert results.field("mx.test") == (
        b"Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=example.test\r\n")
    results.dkim = [DKIMResult("fail", "example.test", "s1", "abcd1234", "body hash mismatch")]
    text = results.field("mx.test").decode()
    assert "dkim=fail (body hash mismatch) header.d=example.test header.s=s1 " \
           "header.b=abcd1234" in text
    assert "dmarc=" not in text and "arc=" not in text
    assert AuthResults().field("mx.test") == b"Authentication-Results: mx.test;\r\n\tnone\r\n"


def test_cached_record_equals_the_looked_up_one(tmp_path_factory: pytest.TempPathFactory
                                                ) -> None:
    server = DnsServer(workdir=tmp_path_factory.mktemp("dmarc-ttl"), txt=RECORDS, ttl=300)
    server.start()
    try:
        resolver = make_resolver(DNSConfig(nameservers=(HostPort(server.host, server.port),),
                                           timeout=1.0))
        for domain in ("example.test", "mail.example.test", "none.test", "two.test",
                       "nothing.test", "news.mail.example.co.uk"):
            assert cached_record(resolver, domain) == (False, None), domain
            looked_up = asyncio.run(asyncio.wait_for(find_record(resolver, domain), 10))
            assert cached_record(resolver, domain) == (True, looked_up), domain
    finally:
        server.stop()


_FROM_PIECES = ["a", "@", "b.c", " ", "<", ">", ",", '"', "(", ")", ";", ":", "Jo", "'", ".",
                "-", "\\", "Ü"]


@settings(max_examples=3000, deadline=None)
@given(parts=st.lists(st.sampled_from(_FROM_PIECES), min_size=1, max_size=10))
def test_from_fast_path_agrees_with_the_email_parser(parts: list[str]) -> None:
    value = "".join(parts)
    addresses = [a for _, a in email.utils.getaddresses([value]) if a]
    domain = from_domain([value])
    if len(addresses) != 1 or "@" not in addresses[0]:
        assert domain is None, value
    elif domain is not None:
        assert domain == addresses[0].rpartition("@")[2].strip().rstrip(".").lower(), value


@settings(max_examples=1000, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("aZ09+/=.-\"\\ é١"), max_size=10))
def test_result_values_quoted_as_by_the_token_pattern(text: str) -> None:
    token = re.match(r"^[!#$%&'*+.0-9A-Z^_`a-z{|}~@-]+$", text)
    quoted = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert results_module._quoted(text) == (text if token else quoted)


@settings(max_examples=1000, deadline=None)
@given(parts=st.lists(st.sampled_from(_FROM_PIECES), min_size=1, max_size=10))
def test_from_field_domain_is_from_domain_of_its_value(parts: list[str]) -> None:
    value = "".join(parts).replace("\\", "")
    fields = HeaderSection.parse(f"From: {value}\r\n".encode()).fields
    for _ in range(2):  # the second from what was kept
        assert from_field_domain(fields) == from_domain([f.value for f in fields])


_SPF = [None, SPFResult("pass", "a.example.test", "mailfrom"),
        SPFResult("fail", "b.test", "helo", "no"), SPFResult("temperror", "example.test",
                                                             "mailfrom")]
_DKIM = [DKIMResult("pass", "example.test", "s"), DKIMResult("fail", "mail.example.test", "s"),
         DKIMResult("temperror", "example.test", "s")]
_RECORDS = [None, Record("reject", 100, False, False, "example.test"),
            Record("quarantine", 100, True, True, "example.test")]


@settings(max_examples=500, deadline=None)
@given(spf=st.sampled_from(_SPF), dkim=st.lists(st.sampled_from(_DKIM), max_size=3),
       record=st.sampled_from(_RECORDS), domain=st.sampled_from(["example.test", "x.test"]))
def test_kept_dmarc_results_equal_evaluate(spf: SPFResult | None, dkim: list[DKIMResult],
                                           record: Record | None, domain: str) -> None:
    results = AuthResults(spf=spf, dkim=dkim)
    theirs = evaluate(record, domain, (spf.result, spf.domain) if spf else None,
                      [(r.result, r.domain) for r in dkim])
    for _ in range(2):  # the second from what was kept
        assert check_module._evaluate(results, domain, record) == theirs


@settings(max_examples=300, deadline=None)
@given(spf=st.sampled_from(_SPF), dkim=st.sampled_from([None, []]),
       arc=st.sampled_from([None, check_module._ARC_NONE, ARCResult("none"),
                            ARCResult("pass", "s.test", 1)]))
def test_kept_header_section_fields_equal_the_built_ones(
        spf: SPFResult | None, dkim: list[DKIMResult] | None, arc: ARCResult | None) -> None:
    check = check_module.AuthCheck(AuthConfig(enabled=True), make_resolver(DNSConfig()),
                                   "mx.test")
    results = AuthResults(spf=spf, dkim=dkim, arc=arc)
    for _ in range(2):  # the second from what was kept
        assert check._early_field(results) == results.field("mx.test")
