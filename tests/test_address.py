"""relayproxy.address: the strict RFC 5321 parser for MAIL FROM / RCPT TO paths.

Tables of accepted and refused arguments, one or more rows per grammar rule (RFC 5321 4.1.2,
4.1.3, 4.5.1, 4.5.3.1; RFC 6531 3.3 for UTF-8), the length limits exactly at and one over,
and Hypothesis properties: generated valid addresses round-trip, and no input makes the parser
raise anything but PathError.
"""

from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayproxy.address import Path, PathError, parse_path

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"


def domain_of(length: int) -> str:
    """A valid domain of exactly `length` octets (labels of at most 63)."""
    labels = []
    while length > 63:
        labels.append("d" * 62)  # plus its dot: 63 octets
        length -= 63
    labels.append("d" * length)
    return ".".join(labels)


# ---------------------------------------------------------------------- accepted

VALID = [
    # keyword and spacing
    pytest.param("FROM:<user@example.com>", "FROM", False, "user", "example.com", "", id="plain"),
    pytest.param("from:<user@example.com>", "FROM", False, "user", "example.com", "", id="kw-lc"),
    pytest.param("To:<user@example.com>", "TO", False, "user", "example.com", "", id="kw-mixed"),
    pytest.param("FROM:   <a@b.example>", "FROM", False, "a", "b.example", "", id="sp-colon"),
    # rest
    pytest.param("FROM:<a@b.example> SIZE=1", "FROM", False, "a", "b.example", "SIZE=1",
                 id="rest"),
    pytest.param("FROM:<a@b.example>   SIZE=1  BODY=8BITMIME", "FROM", False, "a", "b.example",
                 "SIZE=1  BODY=8BITMIME", id="rest-spaces"),
    pytest.param("FROM:<a@b.example>   ", "FROM", False, "a", "b.example", "", id="rest-blank"),
    # null reverse-path
    pytest.param("FROM:<>", "FROM", False, "", "", "", id="null"),
    pytest.param("FROM:<> SIZE=100", "FROM", False, "", "", "SIZE=100", id="null-rest"),
    # without angle brackets (Postfix-compatible leniency)
    pytest.param("FROM:user@example.com", "FROM", False, "user", "example.com", "", id="bare"),
    pytest.param("TO:user@example.com NOTIFY=NEVER", "TO", False, "user", "example.com",
                 "NOTIFY=NEVER", id="bare-rest"),
    pytest.param("FROM: user@example.com", "FROM", False, "user", "example.com", "",
                 id="bare-space"),
    # postmaster (RFC 5321 4.5.1)
    pytest.param("TO:<postmaster>", "TO", False, "postmaster", "", "", id="postmaster"),
    pytest.param("TO:<PostMaster> NOTIFY=NEVER", "TO", False, "PostMaster", "", "NOTIFY=NEVER",
                 id="postmaster-case"),
    pytest.param("TO:postmaster", "TO", False, "postmaster", "", "", id="postmaster-bare"),
    pytest.param("TO:<Postmaster@example.com>", "TO", False, "Postmaster", "example.com", "",
                 id="postmaster-domain"),
    pytest.param("FROM:<postmaster@example.com>", "FROM", False, "postmaster", "example.com", "",
                 id="postmaster-from-domain"),
    # source routes: accepted, ignored (RFC 5321 4.1.2, C.2)
    pytest.param("TO:<@a.example,@b.example:user@c.example>", "TO", False, "user", "c.example",
                 "", id="route-2"),
    pytest.param("FROM:<@a.example:user@c.example> SIZE=1", "FROM", False, "user", "c.example",
                 "SIZE=1", id="route-1"),
    # dot-string local parts
    pytest.param("FROM:<a.b.c@example.com>", "FROM", False, "a.b.c", "example.com", "",
                 id="dots"),
    pytest.param(f"FROM:<{ATEXT[:40]}@example.com>", "FROM", False, ATEXT[:40], "example.com",
                 "", id="atext-alnum"),
    pytest.param(f"FROM:<{ATEXT[40:]}@example.com>", "FROM", False, ATEXT[40:], "example.com",
                 "", id="atext-rest"),
    # quoted local parts, kept verbatim
    pytest.param('FROM:<"john doe"@example.com>', "FROM", False, '"john doe"', "example.com",
                 "", id="quoted-space"),
    pytest.param('FROM:<"a\\"b"@example.com>', "FROM", False, '"a\\"b"', "example.com", "",
                 id="quoted-escaped-quote"),
    pytest.param('FROM:<"a\\\\b"@example.com>', "FROM", False, '"a\\\\b"', "example.com", "",
                 id="quoted-escaped-backslash"),
    pytest.param('FROM:<"a\\ b"@example.com>', "FROM", False, '"a\\ b"', "example.com", "",
                 id="quoted-pair-space"),
    pytest.param('TO:<"<>@,;:[] x"@example.com> X=1', "TO", False, '"<>@,;:[] x"',
                 "example.com", "X=1", id="quoted-specials"),
    pytest.param('FROM:<""@example.com>', "FROM", False, '""', "example.com", "",
                 id="quoted-empty"),
    # domains
    pytest.param("FROM:<u@123.example>", "FROM", False, "u", "123.example", "", id="digit"),
    pytest.param("FROM:<u@a-b--c.example>", "FROM", False, "u", "a-b--c.example", "",
                 id="hyphens-inside"),
    pytest.param("FROM:<u@x>", "FROM", False, "u", "x", "", id="one-letter"),
    pytest.param("FROM:<u@xn--bcher-kva.example>", "FROM", False, "u", "xn--bcher-kva.example",
                 "", id="a-label"),
    # address literals (RFC 5321 4.1.3)
    pytest.param("FROM:<u@[192.0.2.1]>", "FROM", False, "u", "[192.0.2.1]", "", id="ipv4"),
    pytest.param("FROM:<u@[0.0.0.0]>", "FROM", False, "u", "[0.0.0.0]", "", id="ipv4-zero"),
    pytest.param("FROM:<u@[255.255.255.255]>", "FROM", False, "u", "[255.255.255.255]", "",
                 id="ipv4-max"),
    pytest.param("FROM:<u@[IPv6:2001:db8::1]>", "FROM", False, "u", "[IPv6:2001:db8::1]", "",
                 id="ipv6-comp"),
    pytest.param("FROM:<u@[ipv6:2001:DB8::1]>", "FROM", False, "u", "[ipv6:2001:DB8::1]", "",
                 id="ipv6-tag-case"),
    pytest.param("FROM:<u@[IPv6:1:2:3:4:5:6:7:8]>", "FROM", False, "u",
                 "[IPv6:1:2:3:4:5:6:7:8]", "", id="ipv6-full"),
    pytest.param("FROM:<u@[IPv6:1:2:3::6:7:8]>", "FROM", False, "u", "[IPv6:1:2:3::6:7:8]", "",
                 id="ipv6-comp-6"),
    pytest.param("FROM:<u@[IPv6:::]>", "FROM", False, "u", "[IPv6:::]", "", id="ipv6-any"),
    pytest.param("FROM:<u@[IPv6:::ffff:192.0.2.1]>", "FROM", False, "u",
                 "[IPv6:::ffff:192.0.2.1]", "", id="ipv6v4-comp"),
    pytest.param("FROM:<u@[IPv6:1:2:3:4:5:6:192.0.2.1]>", "FROM", False, "u",
                 "[IPv6:1:2:3:4:5:6:192.0.2.1]", "", id="ipv6v4-full"),
    # SMTPUTF8 (RFC 6531 3.3)
    pytest.param("FROM:<pelé@example.com> SMTPUTF8", "FROM", True, "pelé", "example.com",
                 "SMTPUTF8", id="utf8-atext"),
    pytest.param('FROM:<"jöhn dœ"@example.com>', "FROM", True, '"jöhn dœ"', "example.com", "",
                 id="utf8-qtext"),
    pytest.param("TO:<u@bücher.example>", "TO", True, "u", "bücher.example", "", id="u-label"),
    pytest.param("TO:<用户@例子.公司>", "TO", True, "用户", "例子.公司", "", id="u-label-cjk"),
    pytest.param("TO:<@bücher.example:u@example.com>", "TO", True, "u", "example.com", "",
                 id="u-label-route"),
    pytest.param("TO:<u@col·legi.cat>", "TO", True, "u", "col·legi.cat", "", id="middle-dot"),
    pytest.param("FROM:<user@example.com>", "FROM", True, "user", "example.com", "",
                 id="ascii-under-utf8"),
]


@pytest.mark.parametrize(("arg", "keyword", "utf8", "local", "domain", "rest"), VALID)
def test_valid(arg: str, keyword: str, utf8: bool, local: str, domain: str, rest: str) -> None:
    path, got_rest = parse_path(arg, keyword, smtputf8=utf8)
    assert (path.local, path.domain, got_rest) == (local, domain, rest)


# ---------------------------------------------------------------------- refused

INVALID = [
    # keyword and spacing
    pytest.param("FROM:<a@b.example>", "TO", False, "expected TO:", id="wrong-kw"),
    pytest.param("TO:<a@b.example>", "FROM", False, "expected FROM:", id="wrong-kw-2"),
    pytest.param("FROM <a@b.example>", "FROM", False, "expected FROM:", id="sp-before-colon"),
    pytest.param("FROM<a@b.example>", "FROM", False, "expected FROM:", id="no-colon"),
    pytest.param("FRM:<a@b.example>", "FROM", False, "expected FROM:", id="typo"),
    pytest.param("FROM:\t<a@b.example>", "FROM", False, "control", id="tab-after-colon"),
    pytest.param("FROM:", "FROM", False, "missing address", id="empty"),
    pytest.param("FROM:   ", "FROM", False, "missing address", id="blank"),
    # brackets and rest
    pytest.param("FROM:<a@b.example", "FROM", False, "missing '>'", id="unclosed"),
    pytest.param("FROM:<a@b.example>SIZE=1", "FROM", False, "space after", id="rest-glued"),
    pytest.param("FROM:<a@b.example>>", "FROM", False, "space after", id="double-close"),
    pytest.param("FROM:<<a@b.example>>", "FROM", False, "'<' in local part", id="double-open"),
    pytest.param("FROM:a@b.example>", "FROM", False, "angle brackets", id="bare-close"),
    pytest.param("FROM:a<b@c.example", "FROM", False, "angle brackets", id="bare-open"),
    pytest.param("FROM:<a@b.example x>", "FROM", False, "' ' in address", id="space-inside"),
    pytest.param('FROM:"john doe"@example.com', "FROM", False, "unterminated", id="bare-quoted"),
    # null path and postmaster
    pytest.param("TO:<>", "TO", False, "null path", id="null-rcpt"),
    pytest.param("FROM:<postmaster>", "FROM", False, "only valid in RCPT", id="postmaster-mail"),
    pytest.param("FROM:postmaster", "FROM", False, "only valid in RCPT", id="postmaster-bare"),
    pytest.param('TO:<"postmaster">', "TO", False, "expected '@'", id="postmaster-quoted"),
    pytest.param("TO:<postmasterx>", "TO", False, "expected '@'", id="postmaster-longer"),
    pytest.param("TO:<@a.example:postmaster>", "TO", False, "expected '@'",
                 id="postmaster-route"),
    pytest.param("TO:<postmaster@>", "TO", False, "missing domain", id="postmaster-at"),
    # mailbox shape
    pytest.param("FROM:<user>", "FROM", False, "expected '@'", id="no-domain"),
    pytest.param("FROM:<user@>", "FROM", False, "missing domain", id="empty-domain"),
    pytest.param("FROM:<@example.com>", "FROM", False, "source route", id="route-only"),
    pytest.param("FROM:<a@b@c.example>", "FROM", False, "'@' in address", id="two-at"),
    # source routes are checked, then ignored
    pytest.param("TO:<@a.example:>", "TO", False, "in local part", id="route-no-mailbox"),
    pytest.param("TO:<@a.example;user@c.example>", "TO", False, "source route",
                 id="route-separator"),
    pytest.param("TO:<@a.example,user@c.example>", "TO", False, "source route",
                 id="route-missing-at"),
    pytest.param("TO:<@[192.0.2.1]:user@c.example>", "TO", False, "literal in source route",
                 id="route-literal"),
    pytest.param("TO:<@a..example:user@c.example>", "TO", False, "empty label", id="route-label"),
    pytest.param("TO:<@-a.example:user@c.example>", "TO", False, "hyphen", id="route-hyphen"),
    # dot-string
    pytest.param("FROM:<.a@example.com>", "FROM", False, "misplaced dot", id="dot-leading"),
    pytest.param("FROM:<a.@example.com>", "FROM", False, "misplaced dot", id="dot-trailing"),
    pytest.param("FROM:<a..b@example.com>", "FROM", False, "misplaced dot", id="dot-double"),
    pytest.param("FROM:<a b@example.com>", "FROM", False, "expected '@'", id="space-local"),
    pytest.param('FROM:<a"b@example.com>', "FROM", False, "expected '@'", id="quote-in-atom"),
    pytest.param("FROM:<a(b)@example.com>", "FROM", False, "expected '@'", id="paren"),
    pytest.param("FROM:<a\\b@example.com>", "FROM", False, "expected '@'", id="backslash"),
    pytest.param("FROM:<[a]@example.com>", "FROM", False, "'[' in local part", id="bracket"),
    # quoted-string
    pytest.param('FROM:<"ab@example.com>', "FROM", False, "unterminated", id="quote-open"),
    pytest.param('FROM:<"a\\"@example.com>', "FROM", False, "unterminated", id="quote-eaten"),
    pytest.param('FROM:<"a"b@example.com>', "FROM", False, "expected '@'", id="quote-then-atom"),
    pytest.param('FROM:<a"b"@example.com>', "FROM", False, "expected '@'", id="atom-then-quote"),
    pytest.param('FROM:<"a\\', "FROM", False, "quoted pair", id="pair-at-end"),
    pytest.param('FROM:<"\\é"@example.com>', "FROM", True, "quoted pair", id="pair-non-ascii"),
    pytest.param('FROM:<"a\x7fb"@example.com>', "FROM", False, "control", id="quoted-del"),
    pytest.param('FROM:<"a\\\tb"@example.com>', "FROM", False, "control", id="pair-tab"),
    # domain labels (Let-dig / Ldh-str)
    pytest.param("FROM:<u@-example.com>", "FROM", False, "hyphen", id="hyphen-leading"),
    pytest.param("FROM:<u@example-.com>", "FROM", False, "hyphen", id="hyphen-trailing"),
    pytest.param("FROM:<u@example.-com>", "FROM", False, "hyphen", id="hyphen-tld"),
    pytest.param("FROM:<u@-.com>", "FROM", False, "hyphen", id="hyphen-only"),
    pytest.param("FROM:<u@exa_mple.com>", "FROM", False, "'_' in address", id="underscore"),
    pytest.param("FROM:<u@example..com>", "FROM", False, "empty label", id="label-empty"),
    pytest.param("FROM:<u@.example.com>", "FROM", False, "'.' in domain", id="label-leading"),
    pytest.param("FROM:<u@example.com.>", "FROM", False, "empty label", id="trailing-dot"),
    pytest.param("FROM:<u@exa mple.com>", "FROM", False, "' ' in address", id="space-domain"),
    # IPv4 literals
    pytest.param("FROM:<u@[192.0.2.256]>", "FROM", False, "IPv4", id="ipv4-256"),
    pytest.param("FROM:<u@[192.0.2]>", "FROM", False, "IPv4", id="ipv4-3"),
    pytest.param("FROM:<u@[192.0.2.1.5]>", "FROM", False, "IPv4", id="ipv4-5"),
    pytest.param("FROM:<u@[192.0.2.01]>", "FROM", False, "IPv4", id="ipv4-leading-zero"),
    pytest.param("FROM:<u@[1920.0.2.1]>", "FROM", False, "IPv4", id="ipv4-4digits"),
    pytest.param("FROM:<u@[0x1.0.2.1]>", "FROM", False, "IPv4", id="ipv4-hex"),
    pytest.param("FROM:<u@[192.0.2.1 ]>", "FROM", False, "IPv4", id="ipv4-space"),
    pytest.param("FROM:<u@[]>", "FROM", False, "IPv4", id="literal-empty"),
    pytest.param("FROM:<u@[example.com]>", "FROM", False, "IPv4", id="literal-name"),
    pytest.param("FROM:<u@[192.0.2.1>", "FROM", False, "unterminated", id="literal-open"),
    pytest.param("FROM:<u@[192.0.2.1]x>", "FROM", False, "'x' in address", id="literal-tail"),
    pytest.param("FROM:<u@[١٩٢.0.2.1]>", "FROM", True, "IPv4", id="ipv4-arabic-digits"),
    # IPv6 literals
    pytest.param("FROM:<u@[IPv6:2001:db8::g]>", "FROM", False, "IPv6", id="ipv6-hex"),
    pytest.param("FROM:<u@[IPv6:1:2:3:4:5:6:7:8:9]>", "FROM", False, "IPv6", id="ipv6-9"),
    pytest.param("FROM:<u@[IPv6:1:2:3:4:5:6:7]>", "FROM", False, "IPv6", id="ipv6-7"),
    pytest.param("FROM:<u@[IPv6:1::2::3]>", "FROM", False, "IPv6", id="ipv6-two-comp"),
    pytest.param("FROM:<u@[IPv6:1:2:3:4:5:6:7::]>", "FROM", False, "IPv6", id="ipv6-comp-7"),
    pytest.param("FROM:<u@[IPv6:12345::1]>", "FROM", False, "IPv6", id="ipv6-5hex"),
    pytest.param("FROM:<u@[IPv6:fe80::1%eth0]>", "FROM", False, "IPv6", id="ipv6-zone"),
    pytest.param("FROM:<u@[IPv6:2001:db8::/32]>", "FROM", False, "IPv6", id="ipv6-prefix"),
    pytest.param("FROM:<u@[IPv6:192.0.2.1]>", "FROM", False, "IPv6", id="ipv6-only-v4"),
    pytest.param("FROM:<u@[IPv6:1:2:3:4:5::192.0.2.1]>", "FROM", False, "IPv6",
                 id="ipv6v4-comp-5"),
    pytest.param("FROM:<u@[IPv6:::192.0.2.256]>", "FROM", False, "IPv6", id="ipv6v4-bad-v4"),
    pytest.param("FROM:<u@[IPv6:]>", "FROM", False, "IPv6", id="ipv6-empty"),
    pytest.param("FROM:<u@[2001:db8::1]>", "FROM", False, "without the IPv6: tag", id="no-tag"),
    # General-address-literal: well-formed but not routable
    pytest.param("FROM:<u@[x-foo:bar]>", "FROM", False, "not supported", id="general"),
    pytest.param("FROM:<u@[x-foo:]>", "FROM", False, "invalid address literal",
                 id="general-empty"),
    pytest.param("FROM:<u@[x-:bar]>", "FROM", False, "invalid address literal",
                 id="general-bad-tag"),
    # SMTPUTF8 required for any non-ASCII
    pytest.param("FROM:<pelé@example.com>", "FROM", False, "SMTPUTF8", id="utf8-local"),
    pytest.param("FROM:<u@bücher.example>", "FROM", False, "SMTPUTF8", id="utf8-domain"),
    pytest.param('FROM:<"é"@example.com>', "FROM", False, "SMTPUTF8", id="utf8-quoted"),
    pytest.param("FROM:<u@example.com> X=é", "FROM", False, "SMTPUTF8", id="utf8-rest"),
    pytest.param("FROM:<u@bücher.example>", "FROM", False, "SMTPUTF8", id="utf8-bare"),
    # invalid IDNA (RFC 5890-5893)
    pytest.param("TO:<u@☃.example>", "TO", True, "IDNA", id="idna-symbol"),
    pytest.param("TO:<u@BÜCHER.example>", "TO", True, "IDNA", id="idna-capital"),
    pytest.param("TO:<u@\uff45xample.com>", "TO", True, "IDNA", id="idna-fullwidth"),
    pytest.param("TO:<u@\u0301a.example>", "TO", True, "IDNA", id="idna-leading-mark"),
    pytest.param("TO:<u@aא.example>", "TO", True, "IDNA", id="idna-bidi"),
    pytest.param("TO:<u@xn--bü.example>", "TO", True, "IDNA", id="idna-ace-prefix"),
    pytest.param("TO:<u@ab--ü.example>", "TO", True, "IDNA", id="idna-hyphen-3-4"),
    pytest.param("TO:<u@bü-.example>", "TO", True, "hyphen", id="idna-hyphen-end"),
    pytest.param("TO:<u@a\u00b7b.example>", "TO", True, "IDNA", id="idna-middle-dot"),
    pytest.param("TO:<u@a\u3002b.example>", "TO", True, "IDNA", id="idna-ideographic-dot"),
    pytest.param("TO:<u@a\u00a0b.example>", "TO", True, "IDNA", id="idna-nbsp"),
    pytest.param("TO:<u@\u0661\u06f1.example>", "TO", True, "IDNA", id="idna-mixed-digits"),
    pytest.param("TO:<u@"
                 + "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(19))
                 + ".example>", "TO", True, "IDNA", id="idna-a-label-over-63"),
    # control characters and bytes that were not UTF-8
    pytest.param("FROM:<a\x00b@example.com>", "FROM", False, "control", id="nul"),
    pytest.param("FROM:<ab@example.com>\r\n", "FROM", False, "control", id="crlf"),
    pytest.param("FROM:<ab@example.com> X=\x1b", "FROM", False, "control", id="esc-rest"),
    pytest.param("FROM:<a\x85b@example.com>", "FROM", True, "control", id="c1"),
    pytest.param("FROM:<a\udcffb@example.com>", "FROM", True, "UTF-8", id="surrogate"),
    pytest.param("FROM:<a\udcffb@example.com>", "FROM", False, "UTF-8", id="surrogate-ascii"),
]


@pytest.mark.parametrize(("arg", "keyword", "utf8", "reason"), INVALID)
def test_invalid(arg: str, keyword: str, utf8: bool, reason: str) -> None:
    with pytest.raises(PathError) as info:
        parse_path(arg, keyword, smtputf8=utf8)
    message = str(info.value)
    assert reason in message
    assert message.isascii() and message.isprintable()


def test_keyword_must_be_from_or_to() -> None:
    with pytest.raises(ValueError, match="keyword") as info:
        parse_path("HELO:<a@b.example>", "HELO")
    assert not isinstance(info.value, PathError)


# ---------------------------------------------------------------------- Path

def test_path_properties() -> None:
    null, _ = parse_path("FROM:<>", "FROM")
    assert null.is_null and null.address == "" and null.domain_ascii == ""

    postmaster, _ = parse_path("TO:<PostMaster>", "TO")
    assert not postmaster.is_null
    assert postmaster.address == "postmaster" and postmaster.domain_ascii == ""

    quoted, _ = parse_path('TO:<"john doe"@Example.COM>', "TO")
    assert not quoted.is_null
    assert quoted.address == '"john doe"@Example.COM'
    assert quoted.domain_ascii == "example.com"

    literal, _ = parse_path("TO:<u@[IPv6:2001:DB8::1]>", "TO")
    assert literal.address == "u@[IPv6:2001:DB8::1]"
    assert literal.domain_ascii == "[ipv6:2001:db8::1]"


@pytest.mark.parametrize(
    ("domain", "ascii_form"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("Bücher.Example", "xn--bcher-kva.example"),  # ASCII case only; RFC 4343
        ("例子.公司", "xn--fsqu00a.xn--55qx5d"),
        ("col·legi.cat", "xn--collegi-xma.cat"),
    ],
)
def test_domain_ascii_idna(domain: str, ascii_form: str) -> None:
    path, _ = parse_path(f"TO:<u@{domain}>", "TO", smtputf8=True)
    assert path.domain == domain
    assert path.domain_ascii == ascii_form


def test_domain_ascii_strips_trailing_dot() -> None:
    # The parser refuses a trailing dot, but a Path built elsewhere may carry one.
    assert Path("u", "Example.COM.").domain_ascii == "example.com"


def test_path_is_frozen_with_slots() -> None:
    path = Path("u", "example.com")
    with pytest.raises(dataclasses.FrozenInstanceError):
        path.local = "v"  # type: ignore[misc]
    assert not hasattr(path, "__dict__")


# ---------------------------------------------------------------------- limits (RFC 5321 4.5.3.1)

def test_local_part_64_octets() -> None:
    path, _ = parse_path(f"FROM:<{'a' * 64}@example.com>", "FROM")
    assert path.local == "a" * 64
    with pytest.raises(PathError, match="local part longer than 64"):
        parse_path(f"FROM:<{'a' * 65}@example.com>", "FROM")


def test_quoted_local_part_64_octets_counts_the_quotes() -> None:
    parse_path(f'FROM:<"{"a" * 62}"@example.com>', "FROM")
    with pytest.raises(PathError, match="local part longer than 64"):
        parse_path(f'FROM:<"{"a" * 63}"@example.com>', "FROM")


def test_local_part_limit_counts_utf8_octets() -> None:
    parse_path(f"FROM:<{'é' * 32}@example.com>", "FROM", smtputf8=True)
    with pytest.raises(PathError, match="local part longer than 64"):
        parse_path(f"FROM:<{'é' * 32}a@example.com>", "FROM", smtputf8=True)


def test_label_63_octets() -> None:
    path, _ = parse_path(f"FROM:<u@{'a' * 63}.example>", "FROM")
    assert path.domain == "a" * 63 + ".example"
    with pytest.raises(PathError, match="label longer than 63"):
        parse_path(f"FROM:<u@{'a' * 64}.example>", "FROM")


def test_u_label_63_utf8_octets() -> None:
    parse_path(f"FROM:<u@{'ü' * 31}a.example>", "FROM", smtputf8=True)
    with pytest.raises(PathError, match="label longer than 63"):
        parse_path(f"FROM:<u@{'ü' * 32}.example>", "FROM", smtputf8=True)


def test_path_256_octets_including_brackets() -> None:
    domain = domain_of(256 - 2 - 64 - 1)
    at_limit = f"<{'a' * 64}@{domain}>"
    assert len(at_limit) == 256
    path, rest = parse_path(f"TO:{at_limit} X=1", "TO")
    assert (path.domain, rest) == (domain, "X=1")
    with pytest.raises(PathError, match="path longer than 256"):
        parse_path(f"TO:<{'a' * 64}@{domain_of(len(domain) + 1)}>", "TO")


def test_path_limit_includes_the_source_route() -> None:
    route = "@" + domain_of(100) + ":"
    size = 256 - 2 - len(route) - 2
    parse_path(f"TO:<{route}u@{domain_of(size)}>", "TO")
    with pytest.raises(PathError, match="path longer than 256"):
        parse_path(f"TO:<{route}u@{domain_of(size + 1)}>", "TO")


def test_bare_path_limit_counts_the_missing_brackets() -> None:
    parse_path(f"FROM:u@{domain_of(254 - 2)}", "FROM")
    with pytest.raises(PathError, match="path longer than 256"):
        parse_path(f"FROM:u@{domain_of(254 - 1)}", "FROM")


def test_domain_255_octets() -> None:
    # A path holds at most 256 - len("<u@>") = 252 octets of domain, so a 255-octet domain
    # fails on the path limit; one of 256 octets fails on the domain limit itself.
    with pytest.raises(PathError, match="path longer than 256"):
        parse_path(f"FROM:<u@{domain_of(255)}>", "FROM")
    with pytest.raises(PathError, match=r"domain longer than 255 octets$"):
        parse_path(f"FROM:<u@{domain_of(256)}>", "FROM")


def test_domain_255_octets_in_a_label_form() -> None:
    # 84 labels of "ü": 251 octets as written, 671 as A-labels ("xn--tda").
    domain = ".".join(["ü"] * 84)
    with pytest.raises(PathError, match="domain longer than 255 octets in A-label form"):
        parse_path(f"FROM:<u@{domain}>", "FROM", smtputf8=True)


# ---------------------------------------------------------------------- properties

atom = st.text(alphabet=ATEXT, min_size=1, max_size=12)
dot_atom = st.lists(atom, min_size=1, max_size=4).map(".".join)
ldh_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
ldh_domain = st.lists(ldh_label, min_size=1, max_size=4).map(".".join)


@given(local=dot_atom, domain=ldh_domain, utf8=st.booleans())
def test_valid_addresses_round_trip(local: str, domain: str, utf8: bool) -> None:
    for arg in (f"TO:<{local}@{domain}> X=1", f"TO:{local}@{domain} X=1"):
        path, rest = parse_path(arg, "TO", smtputf8=utf8)
        assert (path.local, path.domain, rest) == (local, domain, "X=1")
        assert path.address == f"{local}@{domain}"
        assert path.domain_ascii == domain.lower()


def _check_outcome(arg: str, keyword: str, utf8: bool) -> None:
    """Only PathError may escape; a success must be self-consistent and re-parse the same."""
    try:
        path, rest = parse_path(arg, keyword, smtputf8=utf8)
    except PathError as exc:
        assert str(exc) and str(exc).isascii()
        return
    assert not rest.startswith(" ")
    assert path.domain_ascii.isascii()
    again, _ = parse_path(f"{keyword}:<{path.address}>", keyword, smtputf8=utf8)
    assert again.address == path.address
    assert again.domain_ascii == path.domain_ascii


@given(arg=st.text(), keyword=st.sampled_from(["FROM", "TO"]), utf8=st.booleans())
def test_arbitrary_text_raises_only_path_error(arg: str, keyword: str, utf8: bool) -> None:
    _check_outcome(arg, keyword, utf8)


# st.text() alone seldom gets past "FROM:<"; grammar pieces after a matching keyword reach every
# rule, and a closing suffix lets a fair share of the inputs parse.
_PIECES = st.one_of(
    st.sampled_from([
        "<", ">", "@", ":", ",", ".", '"', "\\", "[", "]", "-", " ", "a", "Z", "0", "9", "!", "~",
        "IPv6:", "postmaster", "::", "xn--", "192.0.2.1", "ffff", "ü", "例", "\u00b7", "\u0301",
        "\u3002", "א", "example", ".example", "@b.example", "\"q\"",
    ]),
    st.characters(exclude_categories=("Cc", "Cs")),
)
_PREFIXES = st.sampled_from([
    "{kw}:", "{kw}:<", "{kw}: <", "{kw}:<@", "{kw}:<a@", '{kw}:<"', "{kw}:<a@[",
    "{kw}:<u@[IPv6:", "{kw}:<@a.example,", "{kw}:<a.b@", "{kw}:<postmaster", "{kw}:a@",
])
_SUFFIXES = st.sampled_from(["", ">", "]>", "> X=1", '"@b.example>', ">SIZE=1"])


@settings(max_examples=1000)
@given(
    prefix=_PREFIXES,
    middle=st.lists(_PIECES, max_size=20).map("".join),
    suffix=_SUFFIXES,
    keyword=st.sampled_from(["FROM", "TO"]),
    utf8=st.booleans(),
)
def test_grammar_shaped_text_raises_only_path_error(
    prefix: str, middle: str, suffix: str, keyword: str, utf8: bool
) -> None:
    _check_outcome(prefix.format(kw=keyword) + middle + suffix, keyword, utf8)


# The fast path (one regex for the common case) must agree with the whole grammar.
_SIMPLE_TEXT = st.text(alphabet=st.sampled_from(
    "abcXYZ019.-_+=<>@: \"\\'!#~[]" ), max_size=40)


@settings(max_examples=400)
@given(st.sampled_from(["FROM", "TO"]), _SIMPLE_TEXT, st.booleans())
def test_fast_path_agrees_with_the_grammar(keyword: str, text: str, utf8: bool) -> None:
    from relayproxy.address import _parse_grammar

    for arg in (f"{keyword}:{text}", f"{keyword}:<{text}>", f"{keyword}:<a@{text}>",
                f"{keyword}:<{text}@b.example> X=1"):
        try:
            expected: object = _parse_grammar(arg, keyword, utf8)
        except PathError as exc:
            expected = type(exc)
        try:
            got: object = parse_path(arg, keyword, smtputf8=utf8)
        except PathError as exc:
            got = type(exc)
        assert got == expected, arg
