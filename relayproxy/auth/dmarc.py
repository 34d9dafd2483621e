"""DMARC (RFC 7489): the From domain's policy record, and the alignment of SPF and DKIM.

The organizational domain comes from the Public Suffix List shipped by the publicsuffixlist
package (no download at run time).
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import dns.asyncresolver
from publicsuffixlist import PublicSuffixList

from ..address import PathError, ascii_domain
from ..headers import HeaderField
from .lookup import Expiring, TempDNSError, cached_txt_until, txt

_PSL = PublicSuffixList()


@lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): the public suffix plus one label."""
    return _PSL.privatesuffix(domain) or domain


def aligned(a: str, b: str, strict: bool) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if strict else org_domain(a) == org_domain(b)


@dataclass(frozen=True, slots=True)
class Record:
    policy: str  # none, quarantine, reject (p=, or sp= for a subdomain)
    pct: int
    strict_spf: bool
    strict_dkim: bool
    domain: str  # where it was found (the From domain, or its organizational domain)


@lru_cache(maxsize=1024)
def parse_record(text: bytes, subdomain: bool, found_at: str) -> Record | None:
    """The policy of a TXT record, None if it is not a valid DMARC record (kept: a Record
    is immutable, and the same domains' records come back message after message)."""
    tags: dict[str, str] = {}
    for part in text.decode("ascii", "replace").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.lstrip().startswith(b"v=DMARC1"):
        return None
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        # RFC 7489 6.6.3: a record with an invalid p= but a valid rua is read as p=none
        if "rua" not in tags:
            return None
        policy = "none"
    if subdomain and tags.get("sp", "").lower() in ("none", "quarantine", "reject"):
        policy = tags["sp"].lower()
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return Record(policy, pct, tags.get("aspf", "r").lower() == "s",
                  tags.get("adkim", "r").lower() == "s", found_at)


async def _record_at(resolver: dns.asyncresolver.Resolver, domain: str, subdomain: bool
                     ) -> Record | None:
    records = [r for r in await txt(resolver, f"_dmarc.{domain}")
               if r.lstrip().startswith(b"v=DMARC1")]
    if len(records) != 1:  # RFC 7489 6.6.3: none, or several, is no policy
        return None
    return parse_record(records[0], subdomain, domain)


async def find_record(resolver: dns.asyncresolver.Resolver, domain: str) -> Record | None:
    """The DMARC record for domain, else for its organizational domain. Raises TempDNSError."""
    found = await _record_at(resolver, domain, False)
    if found is not None:
        return found
    org = org_domain(domain)
    if org != domain:
        return await _record_at(resolver, org, True)
    return None


_RECORD_ENTRIES = 4096
# (resolver, From domain) -> record: cached_record's answer until the first TXT
# answer it read expires; the From domains of most messages were seen a moment ago
_records: Expiring[tuple[int, str], Record | None] = Expiring(_RECORD_ENTRIES)


def cached_record(resolver: dns.asyncresolver.Resolver, domain: str
                  ) -> tuple[bool, Record | None]:
    """find_record from the resolver's cache alone: (known, record); known is False when an
    answer it needs is not in the cache."""
    key = (id(resolver), domain)
    memo = _records.get(key)
    if memo is not None:
        return True, memo[1]
    expires = math.inf
    record = None
    for name, subdomain in ((domain, False), (org_domain(domain), True)):
        if subdomain and name == domain:
            break
        records, expiry = cached_txt_until(resolver, f"_dmarc.{name}")
        if records is None:
            return False, None
        expires = min(expires, expiry)
        found = [r for r in records if r.lstrip().startswith(b"v=DMARC1")]
        if len(found) == 1:
            record = parse_record(found[0], subdomain, name)
            break
        if found:
            break
    _records.put(key, expires, record)
    return True, record


_ATOMS = r"[^\s<>@,;:()\[\]\"\\]+"
_SIMPLE_FROM = re.compile(rf"\s*(?:({_ATOMS}@{_ATOMS})|[\w .'-]*<({_ATOMS}@{_ATOMS})>)\s*\Z")


def from_domain(values: list[str]) -> str | None:
    """The RFC5322.From domain: exactly one From field with exactly one address, else None
    (RFC 7489 6.6.1: such a message cannot be evaluated)."""
    if len(values) != 1:
        return None
    return _domain_of(values[0])


_FROM_ENTRIES = 4096
_from_domains: dict[bytes, str | None] = {}  # a From field as written -> its domain
_UNKNOWN = object()


def from_field_domain(fields: list[HeaderField]) -> str | None:
    """from_domain of the From fields' values; kept by the field as written (its value is a
    function of it): a sender writes the same From field message after message."""
    if len(fields) != 1:
        return None
    raw = fields[0].raw
    domain = _from_domains.get(raw, _UNKNOWN)
    if domain is not _UNKNOWN:
        return domain  # type: ignore[return-value]  # the sentinel is not
    domain = _domain_of(fields[0].value)
    if len(_from_domains) >= _FROM_ENTRIES:
        _from_domains.clear()  # a flood of different fields: start again
    _from_domains[raw] = domain
    return domain


def _domain_of(value: str) -> str | None:
    simple = _SIMPLE_FROM.match(value)
    if simple is not None:
        # the usual forms (an address, or a plain display name and <address>): no parser
        # needed; anything else (comments, groups, quoting, several addresses) is parsed
        addresses = [simple.group(1) or simple.group(2)]
    else:
        addresses = [a for _, a in email.utils.getaddresses([value]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".")
    try:
        return ascii_domain(domain)
    except PathError:
        return None


@dataclass(frozen=True, slots=True)
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    domain: str  # the From domain
    policy: str = ""  # the policy to apply after pct: none, quarantine, reject
    published: str = ""  # p= (or sp=) as published


def evaluate(record: Record | None, domain: str, spf: tuple[str, str] | None,
             dkim: list[tuple[str, str]], sample: float | None = None) -> DMARCResult:
    """spf: (result, domain) of the SPF identity; dkim: (result, d=) of each signature."""
    if record is None:
        return DMARCResult("none", domain)
    ok = (spf is not None and spf[0] == "pass" and aligned(spf[1], domain, record.strict_spf)
          ) or any(r == "pass" and aligned(d, domain, record.strict_dkim) for r, d in dkim)
    if ok:
        return DMARCResult("pass", domain, "none", record.policy)
    temp = (spf is not None and spf[0] == "temperror" and aligned(spf[1], domain,
                                                                  record.strict_spf)
            ) or any(r == "temperror" and aligned(d, domain, record.strict_dkim)
                     for r, d in dkim)
    policy = record.policy
    if record.pct < 100:
        # RFC 7489 6.6.4: outside the sample, the next policy down applies
        draw = random.random() if sample is None else sample
        if draw * 100 >= record.pct:
            policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)
    return DMARCResult("temperror" if temp else "fail", domain, policy, record.policy)


__all__ = ["DMARCResult", "Record", "TempDNSError", "aligned", "evaluate", "find_record",
           "from_domain", "from_field_domain", "org_domain", "parse_record"]
