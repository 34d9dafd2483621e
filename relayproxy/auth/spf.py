"""SPF (RFC 7208) with pyspf, fed by the async resolver: the query is replayed, not blocked.

pyspf asks for DNS answers synchronously, one at a time, through its module's DNSLookup. Here
that function only reads answers already fetched for this query; a missing one is noted and
the evaluation stops with a TempError. The missing names are then fetched asynchronously and
the evaluation runs again from the start with them, until it needs nothing new. pyspf's own
limits (10 DNS mechanisms, 2 void lookups) bound the rounds; MAX_ROUNDS bounds them anyway.
Evaluation is pure computation on the event loop (microseconds per round).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import spf as pyspf

from ..address import PathError, ascii_domain
from .lookup import Expiring, cached_until

MAX_ROUNDS = 150  # >= 10 mechanisms x (1 + 10 MX hosts) + void lookups and the explanation
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_Key = tuple[str, str]
_Answer = list[tuple[_Key, Any]] | None  # None: the lookup failed temporarily


@dataclass(slots=True)
class _Answers:
    known: dict[_Key, _Answer]
    missing: list[_Key]
    resolver: dns.asyncresolver.Resolver
    expires: float = math.inf  # the earliest expiry of the answers used (time.time())


_current: contextvars.ContextVar[_Answers | None] = contextvars.ContextVar(
    "relayproxy_spf_answers", default=None)


def _lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Any:
    """pyspf's DNSLookup: answers from the current query's table, never from the network."""
    answers = _current.get()
    if answers is None:
        raise pyspf.TempError("DNS: no answers prepared (relayproxy)")
    key = (name.lower().rstrip("."), qtype)
    if key not in answers.known:
        hit, cached_answer, expiry = cached_until(answers.resolver, key[0], qtype)
        if hit:
            answers.expires = min(answers.expires, expiry)
            # in the resolver's cache (for its TTL): no round trip, no replay
            answers.known[key] = _convert(key, cached_answer)
            return answers.known[key]
        answers.missing.append(key)
        raise pyspf.TempError(f"DNS {name} {qtype}: not fetched yet")
    found = answers.known[key]
    if found is None:
        raise pyspf.TempError(f"DNS {name} {qtype}: lookup failed")
    return found


# pyspf reads this module global at each lookup; nothing else in the process uses pyspf
pyspf.DNSLookup = _lookup


@dataclass(frozen=True, slots=True)
class SPFResult:
    result: str  # one of RESULTS
    domain: str  # the identity's domain (MAIL FROM, or HELO for the null sender)
    identity: str  # "mailfrom" or "helo"
    explanation: str = ""


async def _fetch(resolver: dns.asyncresolver.Resolver, key: _Key) -> _Answer:
    name, qtype = key
    try:
        answer = await resolver.resolve(name, qtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.name.EmptyLabel,
            dns.name.LabelTooLong, dns.name.NameTooLong):
        return []
    except (dns.exception.DNSException, OSError):
        return None
    return _convert(key, answer)


def _convert(key: _Key, answer: dns.resolver.Answer | None) -> _Answer:
    """An answer in the form pyspf's own dnspython lookup gives."""
    qtype = key[1]
    found: list[tuple[_Key, Any]] = []
    if answer is None:
        return found
    for r in answer:
        if qtype in ("A", "AAAA"):
            found.append((key, r.address))
        elif qtype == "MX":
            found.append((key, (r.preference, r.exchange)))
        elif qtype == "PTR":
            found.append((key, r.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append((key, r.strings))
    return found


def kept(resolver: dns.asyncresolver.Resolver, client_ip: str, sender: str, helo: str,
         receiver: str) -> SPFResult | None:
    """check()'s result kept under these very arguments (and not expired), else None."""
    memo = _results.get((id(resolver), client_ip, sender, helo, receiver))
    return memo[1] if memo is not None else None


async def check(resolver: dns.asyncresolver.Resolver, client_ip: str, sender: str,
                helo: str, receiver: str, timeout: float) -> SPFResult:
    """The SPF result for sender (or, for the null sender, the HELO name) sending from
    client_ip; temperror when DNS fails or `timeout` seconds pass."""
    # kept under the arguments as given too: the next message of a sender is then one look-up,
    # without the domain's A-label form and the lower cases that the kept result is under
    asked = (id(resolver), client_ip, sender, helo, receiver)
    found = kept(resolver, client_ip, sender, helo, receiver)
    if found is not None:
        return found
    local, at, domain_part = sender.rpartition("@")
    identity_domain = domain_part if at else helo
    if identity_domain.startswith("[") or not identity_domain:
        # an address literal names no domain to ask (RFC 7208 2.3, 4.3): no SPF record
        return SPFResult("none", identity_domain, "mailfrom" if at else "helo")
    if at:
        try:
            sender = f"{local}@{ascii_domain(domain_part)}"  # the A-label form is looked up
        except PathError:
            return SPFResult("none", domain_part, "mailfrom")
    memo_key = (id(resolver), client_ip, sender.lower(), helo.lower(), receiver)
    memo = _results.get(memo_key)
    if memo is not None:
        _remember(asked, memo[1], memo[0])
        return memo[1]
    query = pyspf.query(client_ip, sender, helo, receiver=receiver, timeout=timeout)
    identity = query.ident
    domain = query.d
    answers = _Answers({}, [], resolver)
    try:
        async with asyncio.timeout(timeout):
            for _ in range(MAX_ROUNDS):
                answers.missing = []
                token = _current.set(answers)
                try:
                    result, _code, explanation = query.check()
                finally:
                    _current.reset(token)
                if not answers.missing:
                    found = SPFResult(result, domain, identity,
                                      explanation if result == "fail" else "")
                    _remember(memo_key, found, answers.expires)
                    _remember(asked, found, answers.expires)
                    return found
                needed = list(dict.fromkeys(answers.missing))
                fetched = await asyncio.gather(*(_fetch(resolver, k) for k in needed))
                answers.known.update(zip(needed, fetched, strict=True))
                for name, qtype in needed:
                    # fetched answers count as long as the resolver's cache keeps them
                    hit, _answer, expiry = cached_until(resolver, name, qtype)
                    answers.expires = min(answers.expires, expiry if hit else 0.0)
                query = pyspf.query(client_ip, sender, helo, receiver=receiver,
                                    timeout=timeout)
    except TimeoutError:
        pass
    return SPFResult("temperror", domain, identity)


RESULT_ENTRIES = 10_000
# (resolver, ip, sender, HELO, receiver) -> result: a result is a function of these
# and of the DNS answers it read, so it holds until the first of them expires (their TTL);
# temperror is never kept. A sender seen a moment ago costs no evaluation. The key's sender
# and HELO are as looked up (lower case, the A-label form), or as given (check's `asked`).
_results: Expiring[tuple[int, str, str, str, str], SPFResult] = Expiring(RESULT_ENTRIES)


def _remember(key: tuple[int, str, str, str, str], result: SPFResult, expires: float) -> None:
    if result.result == "temperror" or expires <= time.time() or expires == math.inf:
        return
    _results.put(key, expires, result)
