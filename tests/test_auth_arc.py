"""Streamed ARC (relayproxy.auth.arc) against dkimpy's arc_verify on the whole message.

A corpus of chains sealed here (one and two instances, relaxed and simple c=, l=, a body or
a header changed after sealing, a seal that does not verify, a sealer that reported cv=fail,
a missing key, a DNS failure, a large body), keys served by a real DNS server on loopback.
The streamed chain never sees the body, only the body hashes computed as it streams (the
canonicalisation passes shared with the DKIM signatures): its result equals arc_verify's,
reason included, whatever the chunks the body arrives in (Hypothesis draws the split points).
"""

from __future__ import annotations

from collections.abc import Iterator

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.authkeys import rsa_key, seal, sign, tamper_body, tamper_header
from support.dns import DnsServer
from support.streamed import feed_body, fetch_keys

from relayproxy.auth import arc as arcmod
from relayproxy.auth.dkim import BodyHashes, Verifier, parse_header

BASE = (b"From: Alice <alice@signer.test>\r\nTo: bob@relay.test\r\nSubject: ARC corpus\r\n"
        b"Date: Wed, 02 Dec 2026 02:00:00 +0000\r\nMessage-ID: <arc@signer.test>\r\n\r\n"
        b"Hello   world, \t trailing space  \r\n\r\nsecond paragraph\r\n"
        + b"line of body text with  double  spaces\t\r\n" * 40 + b"\r\n\r\n\r\n")
FOOTER = b"-- list footer\r\n"


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = DnsServer(workdir=tmp_path_factory.mktemp("arc-dns"), txt={
        "rsa._domainkey.signer.test": rsa_key().record,
        "arc._domainkey.sealer.test": rsa_key().record,
        "arc._domainkey.list2.test": rsa_key(2048).record,
    }, refused=["timeout.test"])
    server.start()
    yield server
    server.stop()


def _tamper_seal(message: bytes) -> bytes:
    """The ARC-Authentication-Results the top seal signs, changed."""
    return message.replace(b"dkim=pass header.d=signer.test", b"dkim=fail header.d=signer.test",
                           1)


def corpus() -> dict[str, bytes]:
    key, big = rsa_key(), rsa_key(2048)
    signed = sign(BASE, "rsa", "signer.test", key)
    listed = signed + FOOTER  # the list's footer breaks DKIM: ARC says what it saw
    one = seal(listed, "arc", "sealer.test", key)
    out = {"unsealed": signed, "one": one, "unsigned-one": seal(BASE, "arc", "sealer.test", key)}
    for h in (b"relaxed", b"simple"):
        for b in (b"relaxed", b"simple"):
            name = f"{h.decode()}-{b.decode()}"
            out[f"c-{name}"] = seal(listed, "arc", "sealer.test", key, canon=(h, b))
            out[f"length-{name}"] = seal(listed, "arc", "sealer.test", key, canon=(h, b),
                                         length=True)
    out["length-appended"] = out["length-relaxed-relaxed"] + b"appended after sealing\r\n"
    out["two"] = seal(one, "arc", "list2.test", big, cv="pass")
    out["two-modes"] = seal(out["c-simple-simple"], "arc", "list2.test", big, cv="pass")
    out["two-first-body-changed"] = seal(one + b"changed between the sealers\r\n", "arc",
                                         "list2.test", big, cv="pass")
    out["reported-fail"] = seal(one, "arc", "list2.test", big, cv="fail")
    out["body-changed"] = tamper_body(one)
    out["body-appended"] = one + b"appended after sealing\r\n"
    out["header-changed"] = tamper_header(one)
    out["seal-broken"] = _tamper_seal(one)
    out["two-seal-broken"] = _tamper_seal(out["two"])
    out["missing-key"] = seal(listed, "nokey", "sealer.test", key)
    out["dns-failure"] = seal(listed, "arc", "timeout.test", key)
    out["empty-body"] = seal(BASE.split(b"\r\n\r\n")[0] + b"\r\n\r\n", "arc", "sealer.test",
                             key)
    out["large-body"] = seal(BASE + b"a line of a large body, 300 KB or so\r\n" * 8000,
                             "arc", "sealer.test", key, canon=(b"relaxed", b"simple"))
    return out


CORPUS = corpus()


def _reference(message: bytes, keys: dict[str, list[bytes] | None]) -> arcmod.ARCResult:
    """dkimpy's arc_verify on the whole message, with the same keys."""
    failed: list[str] = []
    cv, _results, reason = dkim.arc_verify(message, dnsfunc=arcmod.key_table(keys, failed))
    return arcmod.outcome(cv, reason, failed, dkim.rfc822_parse(message)[0])


def _both(message: bytes, zone: DnsServer, cuts: list[int]
          ) -> tuple[arcmod.ARCResult, list[str], arcmod.ARCResult]:
    """The streamed chain's and DKIM's results (their body hashes fed together, in cuts), and
    arc_verify's."""
    head, _, body = message.partition(b"\r\n\r\n")
    chain = arcmod.Chain(head + b"\r\n", 1024)
    verifier = Verifier(head + b"\r\n", 5, 1024)
    try:
        headers = parse_header(head + b"\r\n\r\n")  # as the Verifier's parse
    except dkim.DKIMException:
        headers = []
    names = arcmod.key_names([(n, v) for n, v in headers])
    keys = fetch_keys([*names, *verifier.key_names], zone.host, zone.port, 2)
    feed_body(BodyHashes([*verifier.hashes, *chain.hashes]), body, cuts)
    dkim_results = [r.result for r in verifier.results(keys)]
    return chain.verify(keys), dkim_results, _reference(message, keys)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_streamed_chain_equals_arc_verify(name: str, zone: DnsServer) -> None:
    streamed, _dkim, reference = _both(CORPUS[name], zone, [])
    assert streamed == reference, name


def test_corpus_covers_every_outcome(zone: DnsServer) -> None:
    """Not all passes: each way a chain breaks gives its result, and DKIM beside it is
    unchanged by the shared body hashing."""
    expect = {
        "unsealed": ("none", ""), "one": ("pass", "sealer.test"),
        "c-simple-simple": ("pass", "sealer.test"), "c-relaxed-simple": ("pass", "sealer.test"),
        "length-simple-relaxed": ("pass", "sealer.test"),
        "length-appended": ("pass", "sealer.test"),
        "two": ("pass", "list2.test"), "two-modes": ("pass", "list2.test"),
        "two-first-body-changed": ("pass", "list2.test"),  # only the latest AMS must hold
        "large-body": ("pass", "sealer.test"), "empty-body": ("pass", "sealer.test"),
        "reported-fail": ("fail", ""), "body-changed": ("fail", ""),
        "body-appended": ("fail", ""), "header-changed": ("fail", ""),
        "seal-broken": ("fail", ""), "two-seal-broken": ("fail", ""),
        "missing-key": ("fail", ""), "dns-failure": ("temperror", ""),
    }
    for name, (result, sealer) in expect.items():
        streamed, _dkim, _reference = _both(CORPUS[name], zone, [])
        assert (streamed.result, streamed.sealer) == (result, sealer), (name, streamed)
    assert _both(CORPUS["one"], zone, [])[1] == ["fail"]  # the footer
    assert _both(CORPUS["unsealed"], zone, [])[1] == ["pass"]
    assert _both(CORPUS["two"], zone, [])[0].instance == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CORPUS)),
       cuts=st.lists(st.integers(min_value=0, max_value=12000), max_size=16))
def test_streamed_chain_equals_arc_verify_whatever_the_chunks(name: str, cuts: list[int],
                                                              zone: DnsServer) -> None:
    streamed, _dkim, reference = _both(CORPUS[name], zone, cuts)
    assert streamed == reference


def test_body_hashes_of_one_mode_are_computed_once() -> None:
    """Every AMS of the same canonicalisation, algorithm and l= shares one body hash."""
    head = CORPUS["two"].partition(b"\r\n\r\n")[0] + b"\r\n"
    assert len(arcmod.Chain(head, 1024).hashes) == 1
    head = CORPUS["two-modes"].partition(b"\r\n\r\n")[0] + b"\r\n"
    assert sorted(h.relaxed for h in arcmod.Chain(head, 1024).hashes) == [False, True]


def test_malformed_header_section_is_a_failed_chain() -> None:
    head = b" folded first\r\nARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.test; s=s; b=AA==\r\n"
    result = arcmod.Chain(head, 1024).verify({})
    assert result.result == "fail"
