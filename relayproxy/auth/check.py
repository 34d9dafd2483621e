"""The authentication check: SPF at MAIL, DKIM/ARC/DMARC while the message streams and at
its end, the Authentication-Results field on top, and the replies their policies call for.

  MAIL       SPF (MAIL FROM, or HELO for the null sender). fail is refused 550 5.7.23 unless
             the domain publishes DMARC (then DMARC decides at the end of data); temperror
             451 4.7.24; each result's action is in [auth.spf].
  headers    forged Authentication-Results (our authserv-id) removed; the DKIM signatures
             and the ARC chain parsed, their keys and the DMARC record fetched in the
             background; a first Authentication-Results with what is known (SPF, and
             dkim=none, arc=none for a message without signature or seal) prepended.
  body       each DKIM signature's and ARC-Message-Signature's body hash, chunk by chunk
             (one canonicalisation pass per mode); the body itself is not kept.
  leaving    (a message larger than the held window: its header section goes downstream
             before the end) DMARC written too when it needs no body: no DKIM signature to
             verify, and the record answered by then.
  end        DKIM, ARC, DMARC; the field replaced by the full one while the header section
             is still held; DMARC's policy decides (550 5.7.1 for reject).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import dns.asyncresolver

from .. import metrics
from ..checks.base import BodyObserver, Check, Envelope, MessageInfo, Need, SessionInfo
from ..config import AuthConfig
from ..headers import HeaderField, HeaderSection
from ..policy.verdict import Verdict
from . import arc as arcmod
from . import dmarc as dmarcmod
from . import spf as spfmod
from .dkim import BodyHash, BodyHashes, Verifier
from .lookup import TempDNSError, cached_txt, txt
from .results import AuthResults, aar_authserv_id, authserv_id

log = logging.getLogger("relayproxy.auth")

KEY = "auth"  # in Envelope.facts: the transaction's AuthResults
_STATE = "auth.state"


_COUNTS = metrics.AUTH_RESULTS.values  # a plain number per (method, result)


def _count(method: str, result: str) -> None:
    key = (method, result)
    if key in _COUNTS:  # a known label value (every one is)
        _COUNTS[key] += 1


_ARC_NONE = arcmod.ARCResult("none")  # a message without ARC-Seal (immutable: shared)
_EARLY_FIELDS = 4096


class _Tx:
    """One transaction's work in progress."""

    __slots__ = ("body", "chain", "dmarc_cached", "dmarc_known", "dmarc_record", "field",
                 "from_count", "from_domain", "known", "lookups", "results", "spf_deferred",
                 "verifier")

    def __init__(self) -> None:
        self.results = AuthResults()
        self.spf_deferred = False  # SPF fail left to DMARC
        self.verifier: Verifier | None = None
        self.chain: arcmod.Chain | None = None  # with an ARC-Seal
        self.body: BodyHashes | None = None  # the DKIM and ARC body hashes, streamed
        self.lookups: dict[str, asyncio.Task[list[bytes]]] = {}
        self.known: dict[str, list[bytes] | None] = {}  # answered from the resolver's cache
        self.dmarc_record: asyncio.Task[dmarcmod.Record | None] | None = None
        self.dmarc_known = False  # the record came from the resolver's cache: dmarc_cached
        self.dmarc_cached: dmarcmod.Record | None = None
        self.from_domain: str | None = None
        self.from_count = 0
        self.field: bytes | None = None  # our Authentication-Results, as prepended

    def cancel(self) -> None:
        for task in self.lookups.values():
            task.cancel()
        if self.dmarc_record is not None:
            self.dmarc_record.cancel()


class AuthCheck(Check):
    name = "auth"
    needs = frozenset({Need.HEADERS, Need.BODY, Need.END_HEADERS})
    instant = True  # every DNS wait is bounded by auth.timeout

    def __init__(self, config: AuthConfig, resolver: dns.asyncresolver.Resolver,
                 hostname: str) -> None:
        self.config = config
        self.resolver = resolver
        self.hostname = hostname
        self.authserv = hostname.lower()
        self.forwarders = tuple(ipaddress.ip_network(n, strict=False)
                                for n in config.dmarc.trusted_forwarders)
        self.sealers = frozenset(d.lower().rstrip(".") for d in config.arc.trusted_sealers)
        # the field prepended at the header section, by what it can say then
        self._early: dict[tuple[spfmod.SPFResult | None, bool, bool], bytes] = {}

    # ------------------------------------------------------------------ state

    def _tx(self, envelope: Envelope) -> _Tx:
        tx = envelope.facts.get(_STATE)
        if not isinstance(tx, _Tx):
            tx = envelope.facts[_STATE] = _Tx()
            envelope.facts[KEY] = tx.results
        return tx

    def _log(self, envelope: Envelope, tx: _Tx) -> None:
        envelope.log_fields.update(tx.results.log_fields())

    # ------------------------------------------------------------------ MAIL: SPF

    async def on_mail(self, session: SessionInfo, envelope: Envelope) -> Verdict | None:
        tx = self._tx(envelope)
        if not self.config.spf.enabled:
            return None
        # a sender seen a moment ago: its kept result, without a coroutine
        result = (spfmod.kept(self.resolver, session.client_ip, envelope.sender, session.helo,
                              self.hostname)
                  or await spfmod.check(self.resolver, session.client_ip, envelope.sender,
                                        session.helo, self.hostname, self.config.timeout))
        tx.results.spf = result
        _count("spf", result.result)
        self._log(envelope, tx)
        action = getattr(self.config.spf, result.result, "ignore")
        if action == "reject" and result.result == "fail" and self.config.dmarc.enabled:
            # a domain with DMARC has said how to treat unauthenticated mail: its policy
            # decides at the end of data, where an aligned DKIM signature can still pass
            try:
                async with asyncio.timeout(self.config.timeout):
                    record = await dmarcmod.find_record(self.resolver, result.domain)
            except (TempDNSError, TimeoutError):
                record = None
            if record is not None:
                tx.spf_deferred = True
                tx.results.notes.append("spf_fail_left_to_dmarc")
                self._log(envelope, tx)
                return None
        if action == "reject":
            text = result.explanation or "SPF check failed"
            return Verdict.reject(f"SPF {result.result} for {result.domain}: "
                                  f"{_printable(text)}", 550, "5.7.23", source="auth",
                                  check="spf")
        if action == "tempfail":
            return Verdict.tempfail(f"SPF {result.result} for {result.domain}, try again "
                                    "later", 451, "4.7.24", source="auth", check="spf")
        if action == "tag":
            tx.results.notes.append(f"spf={result.result}")
        return None

    # ------------------------------------------------------------------ the header section

    async def on_headers(self, session: SessionInfo, envelope: Envelope,
                         headers: HeaderSection) -> Verdict | None:
        tx = self._tx(envelope)
        cfg = self.config
        original = headers.original  # as it came: what was signed
        hashes: list[BodyHash] = []
        if cfg.dkim.enabled:
            tx.verifier = Verifier(original, cfg.dkim.max_signatures, cfg.dkim.min_key_bits,
                                   headers)
            for name in tx.verifier.key_names:
                self._fetch(tx, name)
            hashes += tx.verifier.hashes
            if not tx.verifier.signatures:
                tx.results.dkim = []  # known now, for every message size: dkim=none
        if cfg.dmarc.enabled:  # only DMARC reads the From domain
            froms = headers.get_lower("from")
            tx.from_count = len(froms)
            tx.from_domain = dmarcmod.from_field_domain(froms)
        if cfg.dmarc.enabled and tx.from_domain is not None:
            known, record = dmarcmod.cached_record(self.resolver, tx.from_domain)
            if known:
                tx.dmarc_known, tx.dmarc_cached = True, record
            else:
                tx.dmarc_record = asyncio.ensure_future(
                    dmarcmod.find_record(self.resolver, tx.from_domain))
                tx.dmarc_record.add_done_callback(_retrieved)
        seals: dict[int, str] = {}
        if cfg.arc.enabled and headers.get_lower("arc-seal"):
            arc_fields = [(f.name.encode(), f.raw.split(b":", 1)[1]) for f in headers.fields
                          if f.lname.startswith("arc-")]
            seals = arcmod.seals(arc_fields)
            tx.chain = arcmod.Chain(original, cfg.dkim.min_key_bits)
            for name in arcmod.key_names(arc_fields):
                self._fetch(tx, name)
            hashes += tx.chain.hashes
        elif cfg.arc.enabled:
            tx.results.arc = _ARC_NONE  # no seal: known now
        if hashes:
            tx.body = BodyHashes(hashes)
        self._strip_forged(headers, seals)
        tx.field = self._early_field(tx.results)
        headers.prepend_raw(tx.field)
        return None

    def _early_field(self, results: AuthResults) -> bytes:
        """results.field() at the header section, where all it can hold is spf=, dkim=none
        and arc=none: kept by those (the SPF result is kept for its answers' TTL, and so
        comes back for the next messages of a sender)."""
        if results.dkim or results.dmarc is not None or (
                results.arc is not None and results.arc is not _ARC_NONE):
            return results.field(self.hostname)  # not the usual: built
        key = (results.spf, results.dkim is None, results.arc is None)
        found = self._early.get(key)
        if found is None:
            if len(self._early) >= _EARLY_FIELDS:
                self._early.clear()  # a flood of senders: start again
            found = self._early[key] = results.field(self.hostname)
        return found

    def _fetch(self, tx: _Tx, name: str) -> None:
        if name in tx.lookups or name in tx.known:
            return
        known = cached_txt(self.resolver, name)
        if known is not None:
            tx.known[name] = known
            return
        task = tx.lookups[name] = asyncio.ensure_future(txt(self.resolver, name))
        task.add_done_callback(_retrieved)

    def _strip_forged(self, headers: HeaderSection, seals: dict[int, str]) -> None:
        ours = self.authserv

        def forged_ar(f: HeaderField) -> bool:
            return authserv_id(f.value) == ours

        def forged_aar(f: HeaderField) -> bool:
            # one the chain covers (an ARC-Seal of its instance) stays: removing it would
            # break the chain; the chain's verification decides what it is worth
            instance = arcmod.instance_of(f.value.encode("utf-8", "surrogateescape"))
            return aar_authserv_id(f.value) == ours and instance not in seals

        # most messages have neither field: no pass over the section for them
        if headers.get_lower("authentication-results"):
            headers.remove("Authentication-Results", forged_ar)
        if headers.get_lower("arc-authentication-results"):
            headers.remove("ARC-Authentication-Results", forged_aar)

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        tx = self._tx(envelope)
        return _Observer(self, session, envelope, tx)

    # ------------------------------------------------------------------ the end

    async def _keys(self, tx: _Tx) -> dict[str, list[bytes] | None]:
        keys: dict[str, list[bytes] | None] = dict(tx.known)
        if not tx.lookups:
            return keys
        try:
            async with asyncio.timeout(self.config.timeout):
                await asyncio.wait(tx.lookups.values())
        except TimeoutError:
            pass
        for name, task in tx.lookups.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                keys[name] = task.result()
            else:
                keys[name] = None
                task.cancel()  # overran auth.timeout: its answer is no longer wanted
        return keys

    async def finish(self, session: SessionInfo, envelope: Envelope, tx: _Tx,
                     message: MessageInfo) -> Verdict | None:
        cfg = self.config
        results = tx.results
        # keys from the resolver's cache (the usual) need no wait
        keys: dict[str, list[bytes] | None] = (await self._keys(tx) if tx.lookups
                                                else tx.known)  # (read, not changed)
        if tx.body is not None:
            tx.body.end()
        if tx.verifier is not None:
            results.dkim = tx.verifier.results(keys)
            if not results.dkim:
                _count("dkim", "none")
            for r in results.dkim:
                _count("dkim", r.result)
        if tx.chain is not None:
            results.arc = tx.chain.verify(keys)
        if results.arc is not None:  # a result, or none since the header section
            _count("arc", results.arc.result)
        verdict = (await self._dmarc(session, tx) if self._dmarc_pending(tx)
                   else self._dmarc_verdict(session, tx))
        if results.dmarc is not None:
            _count("dmarc", results.dmarc.result)
        self._log(envelope, tx)
        headers = message.headers
        if headers is not None and not message.headers_sent and tx.field is not None:
            new = results.field(self.hostname)
            headers.replace_prepended(tx.field, new)
            tx.field = new
            if verdict is None and results.notes and _tagged(results):
                headers.prepend(cfg.tag_header, ", ".join(_tagged(results)))
        return verdict

    def _dmarc_pending(self, tx: _Tx) -> bool:
        """DMARC decides now, and its record did not come from the resolver's cache."""
        return (self.config.dmarc.enabled and tx.from_domain is not None
                and tx.results.dmarc is None and not tx.dmarc_known)

    async def _dmarc(self, session: SessionInfo, tx: _Tx) -> Verdict | None:
        """_dmarc_verdict once the record (_dmarc_pending) is in."""
        cfg = self.config
        assert tx.dmarc_record is not None and tx.from_domain is not None
        try:
            async with asyncio.timeout(cfg.timeout):
                record = await tx.dmarc_record
        except (TempDNSError, TimeoutError):
            tx.results.dmarc = dmarcmod.DMARCResult("temperror", tx.from_domain)
            return self._act(cfg.dmarc.temperror, tx.results, "temperror",
                             f"DMARC policy of {tx.from_domain} unavailable")
        tx.dmarc_known, tx.dmarc_cached = True, record
        return self._dmarc_verdict(session, tx)

    def _dmarc_verdict(self, session: SessionInfo, tx: _Tx) -> Verdict | None:
        """DMARC's verdict, its record at hand (tx.dmarc_cached) unless decided already."""
        cfg = self.config
        results = tx.results
        if not cfg.dmarc.enabled:
            return None
        if tx.from_domain is None:
            # RFC 7489 6.6.1: no single author domain, no evaluation; and forgers use that
            results.dmarc = dmarcmod.DMARCResult("permerror", "")
            found = ("no From field" if tx.from_count == 0 else
                     f"{tx.from_count} From fields" if tx.from_count > 1 else
                     "no single address in From")
            return Verdict.reject(f"Message must have exactly one From address ({found})",
                                  550, "5.7.1",
                                  source="auth", check="dmarc")
        # decided already when the header section left (its pct drawn once): that result
        result = results.dmarc
        if result is None:
            result = results.dmarc = _evaluate(results, tx.from_domain, tx.dmarc_cached)
        if result.result == "pass" or (result.result == "none"):
            if tx.spf_deferred and result.result == "none" and results.spf is not None:
                # no policy after all (the From domain differs): SPF's own fail stands
                return Verdict.reject(f"SPF fail for {results.spf.domain}: "
                                      f"{_printable(results.spf.explanation)}", 550, "5.7.23",
                                      source="auth", check="spf")
            return None
        if result.result == "temperror":
            return self._act(cfg.dmarc.temperror, results, "temperror",
                             f"DMARC evaluation for {tx.from_domain} failed temporarily")
        if result.policy == "none":
            return None
        if self._override(session, results):
            return None
        action = cfg.dmarc.reject if result.policy == "reject" else cfg.dmarc.quarantine
        return self._act(action, results, f"fail policy={result.policy}",
                         f"DMARC policy of {tx.from_domain} ({result.policy}) rejects "
                         "unauthenticated mail")

    def headers_leaving(self, tx: _Tx, headers: HeaderSection) -> None:
        """The header section leaves before the end of data: DMARC goes in our field when it
        needs no body, that is no DKIM signature to verify, and its record is at hand."""
        cfg = self.config
        if (not cfg.dmarc.enabled or tx.from_domain is None or tx.field is None
                or (tx.verifier is not None and tx.verifier.signatures)):
            return
        if tx.dmarc_known:
            record = tx.dmarc_cached
        else:
            task = tx.dmarc_record
            if (task is None or not task.done() or task.cancelled()
                    or task.exception() is not None):
                return  # not answered yet, or failed: decided (or not) at the end
            record = task.result()
        tx.results.dmarc = _evaluate(tx.results, tx.from_domain, record)
        new = tx.results.field(self.hostname)
        headers.replace_prepended(tx.field, new)
        tx.field = new

    def _override(self, session: SessionInfo, results: AuthResults) -> bool:
        """Local policy over the domain's: trusted forwarders and ARC sealers."""
        try:
            addr = ipaddress.ip_address(session.client_ip)
        except ValueError:
            addr = None
        if addr is not None and any(addr in n for n in self.forwarders):
            results.notes.append("dmarc_override=trusted_forwarder")
            return True
        arc = results.arc
        if arc is not None and arc.result == "pass" and arc.sealer in self.sealers:
            results.notes.append(f"dmarc_override=arc:{arc.sealer}")
            return True
        return False

    def _act(self, action: str, results: AuthResults, note: str, text: str
             ) -> Verdict | None:
        if action == "reject":
            return Verdict.reject(text, 550, "5.7.1", source="auth", check="dmarc")
        if action == "tempfail":
            return Verdict.tempfail(text + ", try again later", 451, "4.7.1",
                                    source="auth", check="dmarc")
        if action == "tag":
            results.notes.append(f"dmarc={note}")
        return None


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A lookup whose message was refused before its end is never awaited: its failure is
    read here, so asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


_EVALUATED = 4096
# (record, From domain, SPF, DKIM...) -> the result: without a sample to draw (pct=100, or
# no record) DMARC is a function of these, and the same ones come back message after message
_evaluated: dict[tuple[Any, ...], dmarcmod.DMARCResult] = {}


def _evaluate(results: AuthResults, domain: str, record: dmarcmod.Record | None
              ) -> dmarcmod.DMARCResult:
    spf = (results.spf.result, results.spf.domain) if results.spf else None
    dkim = [(r.result, r.domain) for r in results.dkim or []]
    if record is not None and record.pct < 100:
        return dmarcmod.evaluate(record, domain, spf, dkim)  # its own draw for each message
    key = (record, domain, spf, *dkim)
    found = _evaluated.get(key)
    if found is None:
        if len(_evaluated) >= _EVALUATED:
            _evaluated.clear()  # a flood of domains: start again
        found = _evaluated[key] = dmarcmod.evaluate(record, domain, spf, dkim)
    return found


def _tagged(results: AuthResults) -> list[str]:
    return [n for n in results.notes if n.startswith(("spf=", "dmarc="))]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:200]


class _Observer(BodyObserver):
    def __init__(self, check: AuthCheck, session: SessionInfo, envelope: Envelope,
                 tx: _Tx) -> None:
        self.check = check
        self.session = session
        self.envelope = envelope
        self.tx = tx

    async def feed(self, chunk: bytes) -> None:
        if self.tx.body is not None:
            self.tx.body.feed(chunk)

    async def end(self, message: MessageInfo) -> Verdict | None:
        return await self.check.finish(self.session, self.envelope, self.tx, message)

    def headers_leaving(self, headers: HeaderSection) -> None:
        self.check.headers_leaving(self.tx, headers)

    def abort(self) -> None:
        self.tx.cancel()


__all__ = ["KEY", "AuthCheck"]
