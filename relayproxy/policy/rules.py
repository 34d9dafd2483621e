"""Rule files: the schema (validated with msgspec), and their compilation into immutable rules.

A rule file holds `[[rule]]` and `[[limit]]` tables (rules/README.md documents every key).
Validation names the file, the rule and the key; regexes are compiled once, here; address
lists are read once, here. What comes out is a RuleSet of frozen objects that a reload swaps
whole, so a running session never sees half of one rule set and half of another.

Each condition knows the earliest stage at which its facts exist (the HELO name at helo, the
recipient at rcpt, header fields once the header section is held, the body at the end of data),
so a rule is evaluated at the first stage that can decide it, and a rule file that asks for a
fact before it exists is refused at load.
"""

from __future__ import annotations

import enum
import functools
import glob
import ipaddress
import re
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..address import PathError, ascii_domain
from .dnsbl import DnsblZone
from .regex import Regex, fold


class RuleError(ValueError):
    """A rule file is invalid; the message names the file, the rule and the key."""


class Stage(enum.IntEnum):
    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    HEADERS = 4  # the header section is held: "data" rules that read only headers run here
    DATA = 5  # the end of data

    @property
    def label(self) -> str:
        return "data" if self >= Stage.HEADERS else self.name.lower()


_STAGE_NAMES = {"connect": Stage.CONNECT, "helo": Stage.HELO, "mail": Stage.MAIL,
                "rcpt": Stage.RCPT, "data": Stage.DATA}


# ---------------------------------------------------------------------- the schema


class DnsblSpec(msgspec.Struct, forbid_unknown_fields=True):
    zone: str
    codes: list[str] = []


class Match(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    client_ip: str | list[str] | None = None
    client_ip_file: str | None = None
    rdns: str | None = None
    fcrdns: bool | None = None
    helo: str | None = None
    helo_fqdn: bool | None = None
    helo_is_ip_literal: bool | None = None
    helo_mismatch: bool | None = None
    country: str | list[str] | None = None
    sender: str | None = None
    null_sender: bool | None = None
    sender_domain: str | list[str] | None = None  # a list of domains, or a file of them
    recipient: str | None = None
    recipients_over: int | None = None
    header: dict[str, str] | None = None
    header_absent: str | list[str] | None = None
    body: str | None = None
    size_over: int | None = None
    attachment_name: str | None = None
    attachment_type: str | None = None
    dnsbl: str | DnsblSpec | None = None
    rspamd_score_over: float | None = None
    rspamd_symbol: str | list[str] | None = None
    spamd_score_over: float | None = None
    # sender authentication ([auth]): RFC 8601 results, and the domains they are about
    spf: str | list[str] | None = None
    spf_domain: str | list[str] | None = None
    dkim: str | list[str] | None = None
    dkim_domain: str | list[str] | None = None
    dmarc: str | list[str] | None = None
    dmarc_domain: str | list[str] | None = None
    arc: str | list[str] | None = None
    any: list[Match] | None = None
    not_: Match | None = msgspec.field(name="not", default=None)


Action = Literal["reject", "tempfail", "accept", "score", "add_header"]


class RuleSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    match: Match = msgspec.field(default_factory=Match)
    stage: Literal["connect", "helo", "mail", "rcpt", "data"] | None = None
    action: Action = "reject"
    reply: str | None = None
    score: float = 0.0
    monitor: bool = False
    defer: bool = True
    scope: Literal["session", "transaction"] = "session"
    header: str | None = None
    on_dns_error: Literal["skip", "tempfail"] = "skip"


class RuleFileSpec(msgspec.Struct, forbid_unknown_fields=True):
    rule: list[RuleSpec] = []
    limit: list[dict[str, Any]] = []


# ---------------------------------------------------------------------- facts and conditions


_NO_SCANS: Mapping[str, Any] = types.MappingProxyType({})


@dataclass(slots=True, init=False)
class Facts:
    """What the conditions read, gathered by the engine before a stage's rules run."""

    client_ip: str
    client_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    hostname: str  # ours (server.hostname)
    rdns: str | None  # forward-confirmed name, "" none, None unknown (DNS error)
    helo: str
    country: str | None
    dnsbl: dict[DnsblZone, bool | None]  # listed (None: error)
    sender: str | None
    recipient: str | None  # the RCPT being decided (rcpt stage)
    recipients: Sequence[str]  # accepted so far
    headers: Any  # relayproxy.headers.HeaderSection
    size: int
    body: str
    attachments: Sequence[tuple[str, str]]  # (file name, content type)
    part_types: Sequence[str]
    _folded: str | None
    body_seen: dict[str, bool]  # literals found in the body
    # the transaction's Envelope.facts: the content scanners' results (ScanResult, by
    # relayproxy.scanners.result_key), known at the end of data
    scans: Mapping[str, Any]
    auth: Any  # relayproxy.auth.results.AuthResults ([auth] on), else None

    # written out: one Facts per session, and a dataclass's default_factory calls cost more
    # than the rest of it
    def __init__(self, client_ip: str,
                 client_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                 hostname: str, rdns: str | None = None, helo: str = "",
                 country: str | None = None, dnsbl: dict[DnsblZone, bool | None] | None = None,
                 sender: str | None = None, recipient: str | None = None,
                 recipients: Sequence[str] = (), headers: Any = None, size: int = 0,
                 body: str = "", attachments: Sequence[tuple[str, str]] = (),
                 part_types: Sequence[str] = (), _folded: str | None = None,
                 body_seen: dict[str, bool] | None = None,
                 scans: Mapping[str, Any] = _NO_SCANS, auth: Any = None) -> None:
        self.client_ip, self.client_addr, self.hostname = client_ip, client_addr, hostname
        self.rdns, self.helo, self.country = rdns, helo, country
        self.dnsbl = {} if dnsbl is None else dnsbl
        self.sender, self.recipient, self.recipients = sender, recipient, recipients
        self.headers, self.size, self.body = headers, size, body
        self.attachments, self.part_types, self._folded = attachments, part_types, _folded
        self.body_seen = {} if body_seen is None else body_seen
        self.scans, self.auth = scans, auth

    def forget_transaction(self) -> None:
        """Drop what a transaction added (the engine keeps one Facts per session): the next
        one starts unknown, and the body text (up to rules.body_scan_bytes, twice with its
        folded copy) is not held while the session waits."""
        if self.sender is None:
            return  # every stage that sets a transaction's facts sets the sender
        self.sender, self.recipient, self.recipients, self.headers = None, None, (), None
        self.size, self.body, self.attachments, self.part_types = 0, "", (), ()
        self._folded, self.body_seen, self.scans, self.auth = None, {}, _NO_SCANS, None

    def folded_body(self) -> str:
        """The body case-folded once, for every body rule's prefilter."""
        if self._folded is None:
            self._folded = fold(self.body)
        return self._folded


Tri = bool | None  # a condition's answer; None: unknown (a DNS error)
Test = Callable[[Facts], Tri]


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    stage: Stage
    test: Test
    dnsbl: tuple[DnsblZone, ...] = ()  # zones it needs looked up
    needs_rdns: bool = False
    needs_country: bool = False
    # (text, literals): the condition is False unless one of the literals is in the folded
    # text ("body", or "header:" and a lower-case field name); set on top-level conditions
    # only, as the rule's AND then is False too (relayproxy.policy.engine skips the rule)
    gate: tuple[str, tuple[str, ...]] | None = None


def _combine(tests: Sequence[Test], decisive: bool) -> Test:
    """AND (decisive False: one False decides) or OR (decisive True: one True decides), in
    three-valued logic: without a decisive answer, any unknown makes the whole unknown."""
    if len(tests) == 1:
        return tests[0]

    def test(facts: Facts) -> Tri:
        unknown = False
        for t in tests:
            result = t(facts)
            if result is decisive:
                return decisive
            unknown = unknown or result is None
        return None if unknown else not decisive

    return test


def _not(inner: Test) -> Test:
    def test(facts: Facts) -> Tri:
        result = inner(facts)
        return None if result is None else not result

    return test


def _regex(pattern: str, key: str) -> Regex:
    try:
        return Regex(pattern)
    except re.error as exc:
        raise RuleError(f"{key}: invalid regex {pattern!r}: {exc}") from None


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _read_list(path: Path, key: str) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise RuleError(f"{key}: cannot read {path}: {exc.strerror}") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def _networks(items: Iterable[str], key: str) -> tuple[Any, ...]:
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise RuleError(f"{key}: {item!r} is not an address or network") from None
    return tuple(ipaddress.collapse_addresses(n for n in nets if n.version == 4)) + tuple(
        ipaddress.collapse_addresses(n for n in nets if n.version == 6))


def _domains(items: Iterable[str], key: str) -> tuple[frozenset[str], tuple[str, ...]]:
    exact, suffixes = set(), []
    for item in items:
        name = item.strip().lower().rstrip(".")
        try:
            ascii_name = ascii_domain(name.lstrip(".")) if name.lstrip(".") else ""
        except PathError:
            ascii_name = ""
        if not ascii_name:
            raise RuleError(f"{key}: {item!r} is not a domain")
        if name.startswith("."):
            suffixes.append("." + ascii_name)
        else:
            exact.add(ascii_name)
    return frozenset(exact), tuple(suffixes)


def _domain_of(address: str) -> str:
    if "@" not in address:
        return ""
    try:
        return ascii_domain(address.rpartition("@")[2])
    except PathError:
        return address.rpartition("@")[2].lower()


# Both HELO answers are kept for the last few names: a client says the same HELO at each of
# its connections, and the regex and the address parse cost more than the lookup. Bounded:
# the name is the client's to choose.
@functools.lru_cache(maxsize=256)
def _helo_literal(helo: str) -> str | None:
    """The address a HELO names, when it is an address literal (or a bare address)."""
    text = helo[1:-1] if helo.startswith("[") and helo.endswith("]") else helo
    text = text[5:] if text[:5].lower() == "ipv6:" else text
    if not text or not (text[0].isdigit() or ":" in text):
        return None  # a host name: no need to let ipaddress raise on it
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_LDH = re.compile(rf"^(?=.{{1,253}}$)({_LABEL}\.)+[a-z]([a-z0-9-]{{0,61}}[a-z0-9])?$", re.I)


@functools.lru_cache(maxsize=256)
def _helo_fqdn(helo: str) -> bool:
    return _LDH.match(helo.rstrip(".")) is not None


def _scan_result(f: Facts, scanner: str) -> Any:
    """The scanner's result when it scanned the message (else None: unknown, as a DNS error
    is; its on_error already decided whether the message goes on)."""
    result = f.scans.get(f"scanner.{scanner}")  # relayproxy.scanners.result_key
    return result if result is not None and result.score is not None else None


def _score_over(scanner: str, limit: float) -> Test:
    def test(f: Facts) -> Tri:
        result = _scan_result(f, scanner)
        return None if result is None else bool(result.score > limit)

    return test


def _symbol_test(names: frozenset[str]) -> Test:
    def test(f: Facts) -> Tri:
        result = _scan_result(f, "rspamd")
        return None if result is None else any(s in names for s in result.symbols)

    return test


def _header_test(lname: str, rx: Regex) -> Test:
    # an absent field never matches; each field of that name is tried, decoded (RFC 2047)
    def test(f: Facts) -> Tri:
        if f.headers is None:
            return False
        return any(rx.search(h.decoded) for h in f.headers.get_lower(lname))

    return test


@dataclass(slots=True)
class _Builder:
    """Compiles one rule's match table into conditions."""

    base: Path
    rule: str
    countries: bool  # a country database is configured
    conditions: list[Condition] = field(default_factory=list)

    def key(self, name: str) -> str:
        return f"rule {self.rule!r}: match.{name}"

    def compile(self, match: Match, prefix: str = "") -> tuple[Test, list[Condition]]:
        found: list[Condition] = []

        def add(name: str, stage: Stage, test: Test, **extra: Any) -> None:
            if prefix:
                extra.pop("gate", None)  # inside any/not a False decides nothing
            found.append(Condition(prefix + name, stage, test, **extra))

        m = match
        if m.client_ip is not None or m.client_ip_file is not None:
            items = _as_list(m.client_ip or [])
            if m.client_ip_file is not None:
                items = [*items, *_read_list(self.base / m.client_ip_file,
                                             self.key(prefix + "client_ip_file"))]
            nets = _networks(items, self.key(prefix + "client_ip"))
            add("client_ip", Stage.CONNECT,
                lambda f: f.client_addr is not None and any(f.client_addr in n for n in nets))
        if m.rdns is not None:
            rx = _regex(m.rdns, self.key(prefix + "rdns"))
            add("rdns", Stage.CONNECT,
                lambda f: None if f.rdns is None else bool(f.rdns and rx.search(f.rdns)),
                needs_rdns=True)
        if m.fcrdns is not None:
            want = m.fcrdns
            add("fcrdns", Stage.CONNECT,
                lambda f: None if f.rdns is None else bool(f.rdns) == want, needs_rdns=True)
        if m.helo is not None:
            rx = _regex(m.helo, self.key(prefix + "helo"))
            add("helo", Stage.HELO, lambda f: bool(rx.search(f.helo)))
        if m.helo_fqdn is not None:
            want = m.helo_fqdn
            add("helo_fqdn", Stage.HELO,
                lambda f: _helo_fqdn(f.helo) == want)
        if m.helo_is_ip_literal is not None:
            want = m.helo_is_ip_literal
            add("helo_is_ip_literal", Stage.HELO,
                lambda f: (_helo_literal(f.helo) is not None) == want)
        if m.helo_mismatch is not None:
            want = m.helo_mismatch

            def mismatch(f: Facts) -> Tri:
                named = _helo_literal(f.helo)
                ours = f.helo.rstrip(".").lower() == f.hostname.lower()
                foreign = named is not None and named != str(f.client_addr)
                return (ours or foreign) == want

            add("helo_mismatch", Stage.HELO, mismatch)
        if m.country is not None:
            if not self.countries:
                raise RuleError(f"{self.key(prefix + 'country')}: needs rules.country_db")
            codes = frozenset(c.upper() for c in _as_list(m.country))
            add("country", Stage.CONNECT, lambda f: f.country in codes if f.country else False,
                needs_country=True)
        if m.sender is not None:
            rx = _regex(m.sender, self.key(prefix + "sender"))
            add("sender", Stage.MAIL, lambda f: f.sender is not None and bool(rx.search(f.sender)))
        if m.null_sender is not None:
            want = m.null_sender
            add("null_sender", Stage.MAIL, lambda f: (f.sender == "") == want)
        if m.sender_domain is not None:
            value = m.sender_domain  # a list of domains, or the name of a file of them
            items = (_read_list(self.base / value, self.key(prefix + "sender_domain"))
                     if isinstance(value, str) else value)
            exact, suffixes = _domains(items, self.key(prefix + "sender_domain"))

            def in_domains(f: Facts) -> Tri:
                domain = _domain_of(f.sender or "")
                return bool(domain) and (domain in exact or domain.endswith(suffixes))

            add("sender_domain", Stage.MAIL, in_domains)
        if m.recipient is not None:
            rx = _regex(m.recipient, self.key(prefix + "recipient"))

            def recipient(f: Facts) -> Tri:
                if f.recipient is not None:
                    return bool(rx.search(f.recipient))
                return any(rx.search(r) for r in f.recipients)

            add("recipient", Stage.RCPT, recipient)
        if m.recipients_over is not None:
            limit = m.recipients_over
            add("recipients_over", Stage.RCPT,
                lambda f: len(f.recipients) + (f.recipient is not None) > limit)
        for name, pattern in (m.header or {}).items():
            rx = _regex(pattern, self.key(prefix + f"header.{name}"))
            add(f"header.{name.lower()}", Stage.HEADERS, _header_test(name.lower(), rx),
                gate=(f"header:{name.lower()}", rx.literals) if rx.literals else None)
        if m.header_absent is not None:
            names = tuple(n.lower() for n in _as_list(m.header_absent))

            def absent(f: Facts) -> bool:
                if f.headers is not None:
                    for name in names:
                        if not f.headers.get_lower(name):
                            return True
                return False

            add("header_absent", Stage.HEADERS, absent)
        if m.body is not None:
            rx = _regex(m.body, self.key(prefix + "body"))
            add("body", Stage.DATA, lambda f: rx.search(f.body, f.folded_body, f.body_seen),
                gate=("body", rx.literals) if rx.literals else None)
        if m.size_over is not None:
            size = m.size_over
            add("size_over", Stage.DATA, lambda f: f.size > size)
        if m.attachment_name is not None:
            rx = _regex(m.attachment_name, self.key(prefix + "attachment_name"))
            add("attachment_name", Stage.DATA,
                lambda f: bool(f.attachments)
                and any(name and rx.search(name) for name, _ in f.attachments))
        if m.attachment_type is not None:
            rx = _regex(m.attachment_type, self.key(prefix + "attachment_type"))
            add("attachment_type", Stage.DATA, lambda f: any(rx.search(t) for t in f.part_types))
        if m.dnsbl is not None:
            spec = m.dnsbl
            try:
                zone = DnsblZone.parse(spec if isinstance(spec, str) else
                                       {"zone": spec.zone, "codes": spec.codes})
            except ValueError as exc:
                raise RuleError(f"{self.key(prefix + 'dnsbl')}: {exc}") from None
            # keyed by the zone with its codes: two rules may read one zone's answers differently
            add("dnsbl", Stage.CONNECT, lambda f: f.dnsbl.get(zone), dnsbl=(zone,))
        for scanner, over in (("rspamd", m.rspamd_score_over),
                              ("spamd", m.spamd_score_over)):
            if over is not None:
                add(f"{scanner}_score_over", Stage.DATA, _score_over(scanner, over))
        if m.rspamd_symbol is not None:
            add("rspamd_symbol", Stage.DATA, _symbol_test(frozenset(_as_list(m.rspamd_symbol))))
        self._auth(m, prefix, add)
        tests = [c.test for c in found]
        if m.any is not None:
            branches = [self.compile(sub, f"{prefix}any[{i}].") for i, sub in enumerate(m.any)]
            if not branches:
                raise RuleError(f"{self.key(prefix + 'any')}: needs at least one table")
            tests.append(_combine([t for t, _ in branches], True))
            found += [c for _, cs in branches for c in cs]
        if m.not_ is not None:
            inner, cs = self.compile(m.not_, prefix + "not.")
            tests.append(_not(inner))
            found += cs
        return _combine(tests, False), found


    def _auth(self, m: Match, prefix: str, add: Callable[..., None]) -> None:
        """The authentication conditions: a result not computed (auth off, an ARC chain on
        a message too big to hold) matches nothing."""
        def results(key: str, value: str | list[str]) -> frozenset[str]:
            words = frozenset(w.lower() for w in _as_list(value))
            bad = sorted(words - _AUTH_RESULTS)
            if bad:
                raise RuleError(f"{self.key(prefix + key)}: unknown result {bad[0]!r} "
                                f"(one of {', '.join(sorted(_AUTH_RESULTS))})")
            return words

        def domains(key: str, value: str | list[str]) -> Callable[[str], bool]:
            exact, suffixes = _domains(_as_list(value), self.key(prefix + key))
            return lambda d: bool(d) and (d in exact or d.endswith(suffixes))

        if m.spf is not None:
            spf = results("spf", m.spf)
            add("spf", Stage.MAIL, lambda f: _spf(f) is not None and _spf(f).result in spf)
        if m.spf_domain is not None:
            in_spf = domains("spf_domain", m.spf_domain)
            add("spf_domain", Stage.MAIL,
                lambda f: _spf(f) is not None and in_spf(_spf(f).domain))
        if m.dkim is not None:
            dkim = results("dkim", m.dkim)

            def dkim_test(f: Facts) -> Tri:
                found = f.auth.dkim if f.auth is not None else None
                if found is None:
                    return False
                return any(r.result in dkim for r in found) or ("none" in dkim and not found)

            add("dkim", Stage.DATA, dkim_test)
        if m.dkim_domain is not None:
            in_dkim = domains("dkim_domain", m.dkim_domain)
            add("dkim_domain", Stage.DATA, lambda f: f.auth is not None and any(
                r.result == "pass" and in_dkim(r.domain) for r in f.auth.dkim or ()))
        if m.dmarc is not None:
            dmarc = results("dmarc", m.dmarc)
            add("dmarc", Stage.DATA, lambda f: f.auth is not None and f.auth.dmarc is not None
                and f.auth.dmarc.result in dmarc)
        if m.dmarc_domain is not None:
            in_from = domains("dmarc_domain", m.dmarc_domain)
            add("dmarc_domain", Stage.DATA, lambda f: f.auth is not None
                and f.auth.dmarc is not None and in_from(f.auth.dmarc.domain))
        if m.arc is not None:
            arc = results("arc", m.arc)
            add("arc", Stage.DATA, lambda f: f.auth is not None and f.auth.arc is not None
                and f.auth.arc.result in arc)


_AUTH_RESULTS = frozenset(("pass", "fail", "softfail", "neutral", "none", "temperror",
                           "permerror", "policy"))


def _spf(f: Facts) -> Any:
    return f.auth.spf if f.auth is not None else None


# ---------------------------------------------------------------------- compiled rules


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    file: str
    stage: Stage  # where it is evaluated (HEADERS for data rules that read only headers)
    test: Test
    action: str
    reply: tuple[int, str, str] | None  # code, enhanced, text
    score: float
    monitor: bool
    defer: bool
    scope: str
    header: bytes  # the field add_header prepends ("Name: value\r\n")
    on_dns_error: str
    conditions: tuple[Condition, ...]

    @property
    def dnsbl_zones(self) -> tuple[DnsblZone, ...]:
        return tuple(z for c in self.conditions for z in c.dnsbl)

    @property
    def needs_rdns(self) -> bool:
        return any(c.needs_rdns for c in self.conditions)

    @property
    def needs_country(self) -> bool:
        return any(c.needs_country for c in self.conditions)

    @property
    def reads_body(self) -> bool:
        return any(c.key.endswith(("body", "attachment_name", "attachment_type"))
                   for c in self.conditions)

    @property
    def gate(self) -> tuple[str, tuple[str, ...]] | None:
        """A top-level condition's gate: without one of its literals the rule is False."""
        return next((c.gate for c in self.conditions if c.gate is not None), None)

    @property
    def reads_text(self) -> bool:
        return any(c.key.endswith("body") for c in self.conditions)


_REPLY = re.compile(r"^([45])(\d\d)\s+([45]\.\d{1,3}\.\d{1,3})\s+(\S.*)$")


def parse_reply(text: str, key: str, action: str) -> tuple[int, str, str]:
    """ "550 5.7.1 Text": the class must fit the action (reject 5xx, tempfail 4xx)."""
    m = _REPLY.match(text.strip())
    if m is None or m.group(1) != m.group(3)[0]:
        raise RuleError(f"{key}: {text!r} is not a reply like '550 5.7.1 Text' "
                        "(code and enhanced code of the same class)")
    code = int(m.group(1) + m.group(2))
    if (action == "reject" and code < 500) or (action == "tempfail" and code >= 500):
        raise RuleError(f"{key}: a {action} needs a {'5' if action == 'reject' else '4'}xx reply")
    if not m.group(4).isprintable():
        raise RuleError(f"{key}: reply text must be printable")
    return code, m.group(3), m.group(4)


_HEADER_FIELD = re.compile(r"^([!-9;-~]+):[ \t]*(\S.*)$")


def _compile_rule(spec: RuleSpec, file: str, base: Path, countries: bool) -> Rule:
    where = f"rule {spec.name!r}"
    if not spec.name or not spec.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise RuleError(f"{where}: name: use letters, digits, '-', '_' and '.'")
    test, conditions = _Builder(base, spec.name, countries).compile(spec.match)
    earliest = max((c.stage for c in conditions), default=Stage.CONNECT)
    if spec.stage is None:
        stage = earliest
    else:
        declared = _STAGE_NAMES[spec.stage]
        if declared == Stage.DATA:
            declared = earliest if earliest >= Stage.HEADERS else Stage.HEADERS
        if earliest > declared:
            late = max(conditions, key=lambda c: c.stage)
            raise RuleError(f"{where}: match.{late.key}: not known at stage {spec.stage!r} "
                            f"(from stage {late.stage.label!r} on)")
        stage = declared
    reply = None
    if spec.reply is not None:
        if spec.action not in ("reject", "tempfail"):
            raise RuleError(f"{where}: reply: only for reject and tempfail")
        reply = parse_reply(spec.reply, f"{where}: reply", spec.action)
    if spec.action == "score" and spec.score == 0:
        raise RuleError(f"{where}: score: a score rule needs a non-zero score")
    header = b""
    if spec.action == "add_header":
        m = _HEADER_FIELD.match(spec.header or "")
        if m is None or not (spec.header or "").isprintable():
            raise RuleError(f"{where}: header: expected 'Name: value' for add_header")
        header = f"{m.group(1)}: {m.group(2)}\r\n".encode()
    elif spec.header is not None:
        raise RuleError(f"{where}: header: only for add_header")
    if spec.scope != "session" and spec.action != "accept":
        raise RuleError(f"{where}: scope: only for accept")
    if spec.scope == "transaction" and stage < Stage.MAIL:
        raise RuleError(f"{where}: scope: a transaction exists from stage 'mail' on; "
                        f"this rule runs at {stage.label!r}")
    if spec.action == "add_header" and not header.isascii():
        raise RuleError(f"{where}: header: ASCII only (RFC 2047 encode anything else)")
    return Rule(spec.name, file, stage, test, spec.action, reply, spec.score,
                spec.monitor, spec.defer, spec.scope, header, spec.on_dns_error,
                tuple(conditions))


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    limits: tuple[dict[str, Any], ...]  # validated by relayproxy.policy.limits
    files: tuple[str, ...]

    def at(self, stage: Stage) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.stage == stage)


def _validation_error(exc: msgspec.ValidationError, raw: dict[str, Any], file: str) -> RuleError:
    text = str(exc)
    m = re.search(r"\$\.(rule|limit)\[(\d+)\]", text)
    if m:
        items = raw.get(m.group(1), [])
        index = int(m.group(2))
        item = items[index] if isinstance(items, list) and index < len(items) else {}
        name = item.get("name", "") if isinstance(item, dict) else ""
        what = f"{m.group(1)} {name!r}" if name else f"{m.group(1)} #{index + 1}"
        key = text.split(" - at ", 1)
        path = key[1].replace(m.group(0), "").lstrip(".") if len(key) == 2 else ""
        return RuleError(f"{file}: {what}: {path or '(table)'}: {key[0]}")
    return RuleError(f"{file}: {text}")


def load_rules(patterns: Sequence[str], base: Path, countries: bool = False) -> RuleSet:
    """Read and compile every rule file the glob patterns name (relative to base)."""
    files: list[str] = []
    for pattern in patterns:
        path = pattern if Path(pattern).is_absolute() else str(base / pattern)
        matched = sorted(glob.glob(path))
        if not matched and not glob.has_magic(pattern):
            raise RuleError(f"rules.files: no such file {path!r}")
        files += matched
    rules: list[Rule] = []
    limits: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise RuleError(f"{file}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise RuleError(f"{file}: not valid TOML: {exc}") from None
        try:
            spec = msgspec.convert(raw, RuleFileSpec)
        except msgspec.ValidationError as exc:
            raise _validation_error(exc, raw, file) from None
        folder = Path(file).parent
        for rule_spec in spec.rule:
            if rule_spec.name in seen:
                raise RuleError(f"{file}: rule {rule_spec.name!r}: name: already used in "
                                f"{seen[rule_spec.name]}")
            seen[rule_spec.name] = file
            try:
                rules.append(_compile_rule(rule_spec, file, folder, countries))
            except RuleError as exc:
                raise RuleError(f"{file}: {exc}") from None
        limits += spec.limit
    return RuleSet(tuple(rules), tuple(limits), tuple(files))
