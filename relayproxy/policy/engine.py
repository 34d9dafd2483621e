"""The rules engine: a Check that evaluates the rule set at each stage of the conversation.

Each rule runs at the earliest stage that has its facts (relayproxy.policy.rules). Before a
stage's rules run, the facts they need are gathered within rules.check_timeout: DNSBL answers
(all zones looked up in parallel as soon as the connection opens), the verified reverse name,
the country, the header section, the decoded body. A fact that DNS could not provide makes a
condition unknown; a rule whose match is unknown is skipped, or tempfails with
on_dns_error = "tempfail".

Actions: reject and tempfail refuse (at connect, helo and mail the refusal waits for the first
RCPT, so logs show who was targeted and postmaster@/abuse@ still get through: RFC 5321 4.5.1,
RFC 2142; `defer = false` answers at once); accept skips the remaining rules (for the session,
or the transaction); score adds to the transaction's score, checked against rules.reject_score
and rules.tempfail_score after every stage; add_header prepends a field through the held header
section. In monitor mode (per rule, or rules.mode = "monitor") everything is evaluated, logged
and counted, and nothing is enforced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
from dataclasses import dataclass

from .. import metrics
from ..checks.base import (
    BodyObserver,
    Check,
    Envelope,
    MessageInfo,
    Need,
    SessionInfo,
)
from ..headers import HeaderSection
from .dnsbl import Dnsbl, DnsblAnswer, DnsblZone, Listing
from .geo import CountryDB
from .mime import MimeScanner
from .regex import fold, rare_char
from .rules import Facts, Rule, RuleSet, Stage
from .verdict import Action, Verdict

log = logging.getLogger("relayproxy.rules")

_KEY = "rules"  # in SessionInfo.facts and Envelope.facts

# The stages as module constants: Python 3.11 looks an enum member up on its class through a
# descriptor call, and the hooks name their stage several times per message.
_CONNECT, _HELO, _MAIL, _RCPT, _HEADERS, _DATA = Stage


@dataclass(frozen=True, slots=True)
class Settings:
    mode: str = "enforce"  # or "monitor"
    reject_score: float = 10.0
    tempfail_score: float = 0.0  # 0: off
    exempt_recipients: tuple[str, ...] = ("postmaster", "abuse")
    body_scan_bytes: int = 262_144
    check_timeout: float = 10.0
    hostname: str = ""


@dataclass(slots=True)
class Evaluation:
    """One rule evaluated, for logs and `relayproxy test-message`."""

    name: str
    stage: str
    hit: bool | None  # None: unknown (a DNS error)
    action: str  # what it did: its action, "monitor", or "" when it did not hit
    score: float = 0.0


# The per-session and per-transaction state below is made for every message: plain classes
# with slots, their containers written as literals. A dataclass's default_factory calls cost
# three times as much (10k instructions for _SessionState alone), per message.


class _Scores:
    __slots__ = ("monitor_score", "names", "score")

    def __init__(self, score: float = 0.0, names: list[str] | None = None,
                 monitor_score: float = 0.0) -> None:
        self.score = score
        self.names: list[str] = [] if names is None else names
        self.monitor_score = monitor_score

    def add(self, rule: Rule, monitor: bool) -> None:
        if monitor:
            self.monitor_score += rule.score
        else:
            self.score += rule.score
            self.names.append(rule.name)

    def copy(self) -> _Scores:
        return _Scores(self.score, list(self.names), self.monitor_score)


class _SessionState:
    __slots__ = ("accepted", "connect", "country", "dnsbl", "facts", "headers", "helo",
                 "helo_headers", "helo_hits", "helo_pending", "hits", "pending", "rdns",
                 "rdns_known", "trace")

    def __init__(self, trace: list[Evaluation] | None = None) -> None:
        self.dnsbl: dict[DnsblZone, asyncio.Future[DnsblAnswer]] = {}
        self.country: str | None = None
        self.rdns: str | None = None
        self.rdns_known = False
        self.accepted = False
        self.connect = _Scores()
        self.helo = _Scores()  # reset at each HELO/EHLO
        self.pending: Verdict | None = None  # deferred from connect
        self.helo_pending: Verdict | None = None
        self.hits: list[str] = []
        self.helo_hits: list[str] = []
        self.headers: list[bytes] = []  # add_header from connect
        self.helo_headers: list[bytes] = []  # ... from the last HELO
        self.trace = trace
        self.facts: Facts | None = None  # one per session, its transaction part reset by _tx


class _TxState:
    __slots__ = ("accepted", "headers", "hits", "literals", "logged", "mime", "pending",
                 "scores")

    def __init__(self, scores: _Scores, pending: Verdict | None = None,
                 hits: list[str] | None = None, headers: list[bytes] | None = None) -> None:
        self.scores = scores
        self.accepted = False
        self.pending = pending  # deferred from connect, helo or mail
        self.hits: list[str] = [] if hits is None else hits
        self.headers: list[bytes] = [] if headers is None else headers
        self.mime: MimeScanner | None = None
        # the body rules' literals, looked for as text streams
        self.literals: _Literals | None = None
        self.logged: tuple[int, float, float] = (0, 0.0, 0.0)  # what _log last wrote


@dataclass(frozen=True, slots=True)
class _Plan:
    """A stage's rules, with the literal gates that let most of them be skipped unread."""

    rules: tuple[Rule, ...]
    gates: tuple[int, ...]  # per rule: the index of its gate, -1 when it has none
    ungated: tuple[Rule, ...]  # the rules without a gate, for when no gate passes
    # each literal with the gates it opens: in the body, in the header fields named
    body: tuple[tuple[str, tuple[int, ...]], ...]
    header: tuple[tuple[str, tuple[int, ...]], ...]
    fields: tuple[str, ...]  # lower-case names
    gated: bool  # some rule has a gate (body or header)

    @classmethod
    def of(cls, rules: tuple[Rule, ...]) -> _Plan:
        index: dict[tuple[str, tuple[str, ...]], int] = {}
        gates = []
        for rule in rules:
            gate = rule.gate
            gates.append(-1 if gate is None else index.setdefault(gate, len(index)))
        body: dict[str, list[int]] = {}
        header: dict[str, list[int]] = {}
        fields: dict[str, None] = {}
        for (text, literals), i in index.items():
            if text != "body":
                fields[text.removeprefix("header:")] = None
            for literal in literals:
                (body if text == "body" else header).setdefault(literal, []).append(i)
        return cls(rules, tuple(gates),
                   tuple(r for r, g in zip(rules, gates, strict=True) if g < 0),
                   tuple((lit, tuple(g)) for lit, g in body.items()),
                   tuple((lit, tuple(g)) for lit, g in header.items()), tuple(fields),
                   bool(body or header))

    def candidates(self, facts: Facts) -> tuple[Rule, ...] | list[Rule]:
        """The rules that may hit: a gated rule whose text holds none of its literals is
        False (the prefilter never hides a match), so each text is looked through once for
        all of them instead of once per rule."""
        passed: set[int] = set()
        if self.body:
            # shared with the body rules that do run; filled as the body streamed (the
            # folded copy of the whole text is made only for a literal still unknown)
            seen = facts.body_seen
            for literal, gates in self.body:
                hit = seen.get(literal)
                if hit is None:
                    hit = seen[literal] = literal in facts.folded_body()
                if hit:
                    passed.update(gates)
        headers = facts.headers
        if self.header and headers is not None:
            # the whole section in one text (a literal found in another field only costs a
            # rule its own search), with the decoded values of the gated fields when some
            # hold encoded-words (RFC 2047): their text is not in the section as written
            text = headers.text()
            if "=?" in text:
                text = "\0".join([text, *(h.decoded for name in self.fields
                                           for h in headers.get_lower(name))])
            folded = fold(text)
            for literal, gates in self.header:
                if literal in folded:
                    passed.update(gates)
        if not passed:
            return self.ungated
        return [r for r, g in zip(self.rules, self.gates, strict=True) if g < 0 or g in passed]


class _Literals:
    """Which of the body rules' literals the decoded text holds, found as it streams by, so
    that the prefilter needs no folded copy of the whole text (rules.body_scan_bytes per
    message). Folding goes character by character (regex.fold), so the pieces folded one by
    one give what the whole would; the last characters of each are kept for a literal that
    spans two pieces. An ASCII piece is folded only when it may hold a literal: when it has
    some literal's rare character (regex.rare_char) in either case."""

    __slots__ = ("found", "keep", "left", "probes", "tail")

    def __init__(self, literals: tuple[str, ...], keep: int,
                 probes: dict[str, tuple[str, str]] | None = None) -> None:
        self.left = literals  # not found yet
        self.found: tuple[str, ...] = ()
        self.keep = keep  # the longest literal's length, less one
        self.tail = ""
        # each literal's rare character in both cases (RulesCheck computes them once)
        self.probes = probes if probes is not None else probe_table(literals)

    def feed(self, piece: str) -> None:
        left = self.left
        if not left:
            return
        keep = self.keep
        folded: str | None
        inside: tuple[str, ...] = ()
        if piece.isascii():
            probes = self.probes
            for lit in left:
                low, up = probes[lit]
                if low in piece or up in piece:
                    inside += (lit,)
            folded = fold(piece) if inside else None
        else:
            inside, folded = left, fold(piece)
        # (the first piece has nothing before it: a literal in its head is in the piece)
        tail = self.tail
        edge = tail + (folded[:keep] if folded is not None else piece[:keep].lower()) \
            if tail else ""
        for literal in left:
            if literal in edge or (folded is not None and literal in inside
                                   and literal in folded):
                found = tuple(lit for lit in left if lit in edge or (
                    folded is not None and lit in inside and lit in folded))
                self.found += found
                self.left = tuple(lit for lit in left if lit not in found)
                break
        if keep:
            end = folded if folded is not None else piece[-keep:].lower()
            self.tail = (end if len(end) >= keep else self.tail + end)[-keep:]

    def seen(self) -> dict[str, bool]:
        seen = dict.fromkeys(self.left, False)
        for literal in self.found:  # mostly none: no second dict to merge
            seen[literal] = True
        return seen


def probe_table(literals: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Each literal's rare character in both cases, for _Literals."""
    return {lit: (c, c.upper()) for lit in literals for c in (rare_char(lit),)}


class _Body(BodyObserver):
    def __init__(self, scanner: MimeScanner) -> None:
        self.scanner = scanner

    async def feed(self, chunk: bytes) -> None:
        self.scanner.feed(chunk)


def _at_rcpt(verdict: Verdict) -> Verdict:
    """A connect-stage refusal answered at RCPT: 554 and 421 are for greetings (RFC 5321 3.1,
    3.8), a recipient gets 550 or 451 and the session goes on."""
    code = {554: 550, 421: 451}.get(verdict.code or 0, verdict.code)
    return dataclasses.replace(verdict, code=code)


class RulesCheck(Check):
    name = "rules"
    # no deadline timer around each hook: the engine waits only for DNS facts, and bounds that
    # wait itself (rules.check_timeout); everything else it decides at once
    instant = True

    def __init__(self, ruleset: RuleSet, settings: Settings, dnsbl: Dnsbl | None,
                 countries: CountryDB | None = None, trace: bool = False) -> None:
        self.ruleset = ruleset
        self.settings = settings
        self.dnsbl = dnsbl
        self.countries = countries
        self.trace = trace
        self.by_stage = {stage: ruleset.at(stage) for stage in Stage}
        # client address -> parsed (None: unparseable)
        self._addrs: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}
        self.plans = {stage: _Plan.of(rules) for stage, rules in self.by_stage.items()}
        # what each stage's rules need looked up, computed once
        self.stage_zones = {stage: frozenset(z for r in rules for z in r.dnsbl_zones)
                            for stage, rules in self.by_stage.items()}
        self.stage_rdns = {stage: any(r.needs_rdns for r in rules)
                           for stage, rules in self.by_stage.items()}
        self.waits = {stage: bool(self.stage_zones[stage] or self.stage_rdns[stage])
                      for stage in Stage}
        self.zones = frozenset(z for r in ruleset.rules for z in r.dnsbl_zones)
        self.needs_rdns = any(r.needs_rdns for r in ruleset.rules)
        self.needs_country = any(r.needs_country for r in ruleset.rules)
        self.reads_body = any(r.reads_body for r in self.by_stage[Stage.DATA])
        # the parts' names and types are listed for the end of data only if a rule reads them
        keys = [c.key for r in self.by_stage[Stage.DATA] for c in r.conditions]
        self.reads_names = any(k.endswith("attachment_name") for k in keys)
        self.reads_types = any(k.endswith("attachment_type") for k in keys)
        self.monitor_all = settings.mode == "monitor"
        # the least score that refuses: below it (most transactions) no _threshold call
        self.refusing = min((x for x in (settings.reject_score, settings.tempfail_score) if x),
                            default=math.inf)
        # the literals the body prefilter looks for, looked for as the text streams (one
        # with a line break could span the break between two parts: left to the prefilter)
        self.body_literals = tuple(lit for lit, _ in self.plans[Stage.DATA].body
                                   if "\n" not in lit)
        self.literal_keep = max(map(len, self.body_literals), default=1) - 1
        self.literal_probes = probe_table(self.body_literals)
        # the decoded text only for body conditions: attachments need just the part headers
        self.text_budget = settings.body_scan_bytes if any(
            r.reads_text for r in self.by_stage[Stage.DATA]) else 0
        exempt = [e.lower() for e in settings.exempt_recipients]
        self.exempt_locals = frozenset(e for e in exempt if "@" not in e)
        self.exempt_addresses = frozenset(e for e in exempt if "@" in e)
        needs = {Need.HEADERS}
        if self.reads_body:
            needs.add(Need.BODY)
        if any(r.action == "add_header" for r in self.by_stage[Stage.DATA]):
            needs.add(Need.END_HEADERS)  # the field goes on top of a held message only
        self.needs = frozenset(needs)
        # without rules at MAIL the transaction's state is made by the first RCPT (_tx logs
        # what connect and HELO left)
        self.idle = frozenset() if self.by_stage[Stage.MAIL] else frozenset({"on_mail"})
        # the counters' children, resolved once (a labels() call costs a lock and a lookup)
        self.hit_counters = {
            (rule.name, action): metrics.RULE_HITS.labels(rule.name, action)
            for rule in ruleset.rules for action in {rule.action, "monitor", "tempfail"}}

    # state

    # The stages look their state up first (session.facts.get(_KEY) or self._session(...)):
    # it exists but at connect and at a transaction's first stage, and a call costs.

    def _session(self, session: SessionInfo) -> _SessionState:
        state = session.facts.get(_KEY)
        if state is None:
            state = session.facts[_KEY] = _SessionState(trace=[] if self.trace else None)
        return state  # only this class writes _KEY

    def _tx(self, s: _SessionState, envelope: Envelope) -> _TxState:
        tx = envelope.facts.get(_KEY)
        if tx is None:
            if s.facts is not None:
                s.facts.forget_transaction()
            # (a score, a monitor score or a deferred refusal comes with a hit)
            if not (s.hits or s.helo_hits or s.pending or s.helo_pending or s.headers
                    or s.helo_headers):
                # nothing hit at connect or HELO (most sessions): nothing to carry or log
                tx = envelope.facts[_KEY] = _TxState(_Scores())
                return tx
            scores = s.connect.copy()
            scores.score += s.helo.score
            scores.names += s.helo.names
            scores.monitor_score += s.helo.monitor_score
            tx = envelope.facts[_KEY] = _TxState(scores, pending=s.pending or s.helo_pending,
                                                 hits=[*s.hits, *s.helo_hits],
                                                 headers=[*s.headers, *s.helo_headers])
            self._log(envelope, tx)  # the hits of connect and HELO, whatever comes next
        return tx  # only this class writes _KEY

    # facts

    def _facts(self, session: SessionInfo, s: _SessionState) -> Facts:
        """The facts known without waiting; _wait adds the DNS ones a stage needs."""
        facts = s.facts
        if facts is None:
            # parsed once per address, not per session: most clients come back
            ip = session.client_ip
            if ip in self._addrs:
                addr = self._addrs[ip]
            else:
                try:
                    addr = ipaddress.ip_address(ip)
                except ValueError:
                    addr = None
                if len(self._addrs) >= 4096:
                    self._addrs.clear()
                self._addrs[ip] = addr
            facts = s.facts = Facts(ip, addr, self.settings.hostname)
        facts.helo = session.helo
        facts.country = s.country
        facts.rdns = s.rdns if s.rdns_known else None
        facts.recipient = None  # the rcpt stage sets it for its own rules only
        return facts

    def _must_wait(self, session: SessionInfo, s: _SessionState, stage: Stage) -> bool:
        """Do the stage's rules wait for a DNS fact? Not for a reverse name when reverse DNS
        is off (it is unknown then): no coroutine, no timer for that. (The stages look at
        self.waits first: most have nothing to wait for, and a method call costs.)"""
        if not self.waits[stage]:
            return False
        if self.stage_zones[stage]:
            return True
        if s.rdns_known:
            return False
        if session.name_lookup is None:
            s.rdns, s.rdns_known = None, True
            return False
        return True

    async def _stage_facts(self, session: SessionInfo, s: _SessionState, stage: Stage
                           ) -> Facts:
        """The facts of a stage whose rules need DNS answers (the others take _facts as it is:
        no coroutine for them)."""
        facts = self._facts(session, s)
        await self._wait(session, s, stage, facts)
        return facts

    async def _wait(self, session: SessionInfo, s: _SessionState, stage: Stage,
                    facts: Facts) -> None:
        """Wait (within rules.check_timeout) for the DNS facts the stage's rules read."""
        zones = self.stage_zones[stage]
        need_rdns = self.stage_rdns[stage] and not s.rdns_known
        if need_rdns and session.name_lookup is None:
            # reverse DNS is off: the name is unknown, and nothing to wait for (no timer)
            s.rdns, s.rdns_known, need_rdns = None, True, False
        if zones or need_rdns:
            try:
                async with asyncio.timeout(self.settings.check_timeout):
                    if need_rdns:
                        s.rdns = await self._rdns(session)
                        s.rdns_known = True
                    for zone in zones:
                        answer = await asyncio.shield(s.dnsbl[zone])
                        facts.dnsbl[zone] = (None if answer.listing is Listing.ERROR
                                             else answer.listing is Listing.LISTED)
            except TimeoutError:
                log.warning("session %s: rules facts timed out after %.1fs",
                            session.session_id, self.settings.check_timeout)
        facts.rdns = s.rdns if s.rdns_known else None

    async def _rdns(self, session: SessionInfo) -> str | None:
        if session.name_lookup is None:
            return None  # reverse DNS is off: the name is unknown, not missing
        name = await session.name_lookup()
        if name == "[TEMPUNAVAIL]":
            return None
        return "" if name.startswith("[") else name

    # evaluation

    def _run(self, stage: Stage, rules: tuple[Rule, ...], facts: Facts, s: _SessionState,
             scores: _Scores, hits: list[str], headers: list[bytes] | None
             ) -> tuple[Verdict | None, Rule | None]:
        """Evaluate rules in order: (refusal, the accept rule that ended it). Scores and hits
        are updated."""
        global_monitor = self.monitor_all
        trace = s.trace
        # a trace lists every rule; otherwise rules that cannot hit are not even called
        plan = self.plans[stage]
        gated = plan.gated
        for rule in rules if trace is not None or not gated else plan.candidates(facts):
            result = rule.test(facts)
            if result is False and trace is None:
                continue  # the common case, kept short: fifty rules run per message
            monitor = global_monitor or rule.monitor
            verdict: Verdict | None = None
            if result is None and rule.on_dns_error == "tempfail":
                action = "monitor" if monitor else "tempfail"
                if not monitor:
                    verdict = Verdict(Action.TEMPFAIL, f"Temporary DNS failure in policy "
                                      f"({rule.name}), try again later",
                                      421 if stage == _CONNECT else 451, "4.7.1",
                                      source="rule", check=rule.name, defer=rule.defer)
            elif not result:
                action = ""
            else:
                action = "monitor" if monitor else rule.action
            if trace is not None:
                trace.append(Evaluation(rule.name, stage.label, result, action,
                                          rule.score if result else 0.0))
            if not action:
                continue
            self.hit_counters[rule.name, action].inc()
            hits.append(rule.name if action != "monitor" else f"{rule.name}(monitor)")
            if action == "score" or (monitor and rule.action == "score"):
                scores.add(rule, monitor)
            if monitor:
                continue
            if action == "accept":
                return None, rule
            if action == "add_header" and headers is not None:
                headers.append(rule.header)
            if action in ("reject", "tempfail"):
                verdict = verdict or self._refusal(rule, stage)
            if verdict is not None:
                return verdict, None
        return None, None

    def _refusal(self, rule: Rule, stage: Stage) -> Verdict:
        if rule.reply is not None:
            code, enhanced, text = rule.reply
        elif rule.action == "reject":
            code, enhanced = (554 if stage == _CONNECT else 550), "5.7.1"
            text = f"Rejected by policy ({rule.name})"
        else:
            code, enhanced = (421 if stage == _CONNECT else 451), "4.7.1"
            text = f"Temporarily rejected by policy ({rule.name}), try again later"
        action = Action.REJECT if code >= 500 else Action.TEMPFAIL
        return Verdict(action, text, code, enhanced, source="rule", check=rule.name,
                       defer=rule.defer)

    @staticmethod
    def _accept(rule: Rule | None, s: _SessionState, tx: _TxState | None) -> bool:
        """Record an accept (for the session, or the transaction): does it hold now?"""
        if rule is not None:
            if rule.scope == "session" or tx is None:
                s.accepted = True
            else:
                tx.accepted = True
        return s.accepted or (tx is not None and tx.accepted)

    def _threshold(self, scores: _Scores, stage: Stage, *more: _Scores) -> Verdict | None:
        """The refusal the scores (added up) call for, if any. The stages call it only for
        a total of at least self.refusing: below that it has nothing to say."""
        st = self.settings
        score = scores.score
        for m in more:
            score += m.score
        if not ((st.reject_score and score >= st.reject_score)
                or (st.tempfail_score and score >= st.tempfail_score)):
            return None  # the usual case: no names to join
        names = ", ".join([*scores.names, *(n for m in more for n in m.names)])
        if st.reject_score and score >= st.reject_score:
            return Verdict(Action.REJECT, f"Rejected by policy ({names})",
                           554 if stage == _CONNECT else 550, "5.7.1", source="rule",
                           check="score", defer=True)
        if st.tempfail_score and score >= st.tempfail_score:
            return Verdict(Action.TEMPFAIL, f"Temporarily rejected by policy ({names}), "
                           "try again later", 421 if stage == _CONNECT else 451, "4.7.1",
                           source="rule", check="score", defer=True)
        return None

    # the stages

    async def on_connect(self, session: SessionInfo) -> Verdict | None:
        s = self._session(session)
        if self.dnsbl is not None:
            for zone in self.zones:  # all zones at once, awaited when needed
                s.dnsbl[zone] = self.dnsbl.lookup(session.client_ip, zone)
        if self.needs_country and self.countries is not None:
            s.country = self.countries.country(session.client_ip)
        rules = self.by_stage[_CONNECT]
        if not rules:
            return None
        facts = (await self._stage_facts(session, s, _CONNECT)
                 if self.waits[_CONNECT] and self._must_wait(session, s, _CONNECT)
                 else self._facts(session, s))
        verdict, accept = self._run(_CONNECT, rules, facts, s, s.connect, s.hits,
                                    s.headers)
        accepted = accept is not None and self._accept(accept, s, None)
        if verdict is None and not accepted and s.connect.score >= self.refusing:
            verdict = self._threshold(s.connect, _CONNECT)
        if verdict is not None and verdict.defer:
            s.pending = _at_rcpt(verdict)
            return None
        return verdict

    async def on_helo(self, session: SessionInfo) -> Verdict | None:
        s: _SessionState = session.facts.get(_KEY) or self._session(session)
        # a new HELO starts over: what the last one's rules said is forgotten
        if s.helo_hits or s.helo_pending or s.helo_headers or s.helo.names or \
                s.helo.monitor_score:  # the first HELO finds them empty: no new objects
            s.helo, s.helo_hits, s.helo_pending, s.helo_headers = _Scores(), [], None, []
        rules = self.by_stage[_HELO]
        if s.accepted or not rules:
            return None
        facts = (await self._stage_facts(session, s, _HELO)
                 if self.waits[_HELO] and self._must_wait(session, s, _HELO)
                 else self._facts(session, s))
        verdict, accept = self._run(_HELO, rules, facts, s, s.helo, s.helo_hits,
                                    s.helo_headers)
        if verdict is None and not (accept is not None and self._accept(accept, s, None)) \
                and s.connect.score + s.helo.score >= self.refusing:
            verdict = self._threshold(s.connect, _HELO, s.helo)
        if verdict is not None and verdict.defer:
            s.helo_pending = _at_rcpt(verdict)
            return None
        return verdict

    async def on_mail(self, session: SessionInfo, envelope: Envelope) -> Verdict | None:
        s: _SessionState = session.facts.get(_KEY) or self._session(session)
        tx: _TxState = envelope.facts.get(_KEY) or self._tx(s, envelope)
        rules = self.by_stage[_MAIL]
        if s.accepted or not rules:
            if tx.hits:  # else nothing to log: a score comes with a hit
                self._log(envelope, tx)
            return None
        facts = (await self._stage_facts(session, s, _MAIL)
                 if self.waits[_MAIL] and self._must_wait(session, s, _MAIL)
                 else self._facts(session, s))
        facts.sender = envelope.sender
        facts.auth = envelope.facts.get("auth")
        verdict, accept = self._run(_MAIL, rules, facts, s, tx.scores, tx.hits,
                                    tx.headers)
        accepted = accept is not None and self._accept(accept, s, tx)
        if verdict is None and not accepted and tx.scores.score >= self.refusing:
            verdict = self._threshold(tx.scores, _MAIL)
        if tx.hits:  # else nothing to log: a score comes with a hit
            self._log(envelope, tx)
        if verdict is not None and verdict.defer:
            tx.pending = tx.pending or _at_rcpt(verdict)
            return None
        return verdict

    def _exempt(self, recipient: str) -> bool:
        local = recipient.rpartition("@")[0] if "@" in recipient else recipient
        return (local.lower().strip('"') in self.exempt_locals
                or recipient.lower() in self.exempt_addresses)

    async def on_rcpt(
        self, session: SessionInfo, envelope: Envelope, recipient: str
    ) -> Verdict | None:
        s: _SessionState = session.facts.get(_KEY) or self._session(session)
        tx: _TxState = envelope.facts.get(_KEY) or self._tx(s, envelope)
        # a refusal decided before RCPT stands whatever a later accept says: deferring it must
        # not change the outcome (a forged sender must not undo a DNSBL listing)
        if tx.pending is not None and not self._exempt(recipient):
            return tx.pending
        if s.accepted or tx.accepted:
            return None
        rules = self.by_stage[_RCPT]
        if not rules:
            return None
        facts = (await self._stage_facts(session, s, _RCPT)
                 if self.waits[_RCPT] and self._must_wait(session, s, _RCPT)
                 else self._facts(session, s))
        facts.sender, facts.recipient = envelope.sender, recipient
        facts.auth = envelope.facts.get("auth")
        facts.recipients = envelope.recipients
        scores = tx.scores.copy()  # a recipient's rules decide for that recipient only
        hits: list[str] = []
        added: list[bytes] = []
        verdict, accept = self._run(_RCPT, rules, facts, s, scores, hits, added)
        accepted = accept is not None and self._accept(accept, s, tx)
        if verdict is None and not accepted and scores.score >= self.refusing:
            verdict = self._threshold(scores, _RCPT)
        tx.headers += [h for h in added if h not in tx.headers]  # once, however many match
        tx.hits += [h for h in hits if h not in tx.hits]
        if verdict is None or self._exempt(recipient):
            return None
        return verdict

    async def on_headers(
        self, session: SessionInfo, envelope: Envelope, headers: HeaderSection
    ) -> Verdict | None:
        s: _SessionState = session.facts.get(_KEY) or self._session(session)
        tx: _TxState = envelope.facts.get(_KEY) or self._tx(s, envelope)
        verdict = None
        if self.reads_body:
            ctype = headers.get_lower("content-type")
            cte = headers.get_lower("content-transfer-encoding")
            finder = tx.literals = (_Literals(self.body_literals, self.literal_keep,
                                              self.literal_probes)
                                    if self.body_literals and self.text_budget else None)
            tx.mime = MimeScanner(ctype[0].value if ctype else None,
                                  cte[0].value if cte else None, self.text_budget,
                                  finder.feed if finder is not None else None)
        rules = self.by_stage[_HEADERS]
        if rules and not (s.accepted or tx.accepted or tx.pending):
            facts = (await self._stage_facts(session, s, _HEADERS)
                     if self.waits[_HEADERS] and self._must_wait(session, s, _HEADERS)
                     else self._facts(session, s))
            self._envelope_facts(facts, envelope, headers)
            verdict, accept = self._run(_HEADERS, rules, facts, s, tx.scores,
                                        tx.hits, tx.headers)
            accepted = accept is not None and self._accept(accept, s, tx)
            if verdict is None and not accepted and tx.scores.score >= self.refusing:
                verdict = self._threshold(tx.scores, _HEADERS)
            if tx.hits:  # else nothing to log: a score comes with a hit
                self._log(envelope, tx)
        for header in reversed(tx.headers):
            headers.prepend_raw(header)
        tx.headers.clear()
        return verdict

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        if not self.reads_body:
            return None
        tx: _TxState = envelope.facts.get(_KEY) or self._tx(self._session(session), envelope)
        mime = tx.mime
        # a message whose headers said all: its body streams by unobserved
        return _Body(mime) if mime is not None and not mime.settled else None

    def _envelope_facts(self, facts: Facts, envelope: Envelope,
                        headers: HeaderSection | None) -> None:
        facts.sender = envelope.sender
        facts.recipients = envelope.recipients
        facts.headers = headers
        facts.auth = envelope.facts.get("auth")  # relayproxy.auth: the results so far

    async def on_data_end(
        self, session: SessionInfo, envelope: Envelope, message: MessageInfo
    ) -> Verdict | None:
        s: _SessionState = session.facts.get(_KEY) or self._session(session)
        tx: _TxState = envelope.facts.get(_KEY) or self._tx(s, envelope)
        # the scanner is read once, here: its text (up to rules.body_scan_bytes) need not
        # live as long as the transaction (until the next MAIL, on a busy connection)
        mime, tx.mime = tx.mime, None
        rules = self.by_stage[_DATA]
        # pending: a refusal from before RCPT that only exempt recipients got past; their
        # mail (abuse reports quote spam) is not refused now
        if not rules or s.accepted or tx.accepted or tx.pending:
            return None
        facts = (await self._stage_facts(session, s, _DATA)
                 if self.waits[_DATA] and self._must_wait(session, s, _DATA)
                 else self._facts(session, s))
        self._envelope_facts(facts, envelope, message.headers)
        facts.size = message.size
        facts.scans = envelope.facts  # the scanners' results: their observers ended first
        if mime is not None:
            mime.close()
            facts.body = mime.text
            if tx.literals is not None:
                facts.body_seen = tx.literals.seen()
            if self.reads_names and (attachments := mime.attachments):
                facts.attachments = [(name, p.content_type) for p in attachments
                                     for name in (p.names or ("",))]
            if self.reads_types:
                facts.part_types = [p.content_type for p in mime.parts]
        added: list[bytes] = []
        verdict, accept = self._run(_DATA, rules, facts, s, tx.scores, tx.hits, added)
        facts.forget_transaction()
        accepted = accept is not None and self._accept(accept, s, tx)
        if verdict is None and not accepted and tx.scores.score >= self.refusing:
            verdict = self._threshold(tx.scores, _DATA)
        if verdict is None and added and message.headers is not None:
            if message.headers_sent:
                log.info("session %s: add_header too late for a message larger than "
                         "server.hold_bytes: %s", session.session_id, b", ".join(added))
            else:
                for header in reversed(added):
                    message.headers.prepend_raw(header)
        if tx.hits:  # else nothing to log: a score comes with a hit
            self._log(envelope, tx)
        return verdict

    def _log(self, envelope: Envelope, tx: _TxState) -> None:
        scores = tx.scores
        now = (len(tx.hits), scores.score, scores.monitor_score)
        if now == tx.logged:
            return  # the usual case: nothing hit since the last stage
        tx.logged = now
        if tx.hits:
            envelope.log_fields["rules"] = ",".join(tx.hits)
        if scores.score or scores.monitor_score:
            envelope.log_fields["score"] = f"{scores.score:g}"
            if scores.monitor_score:
                envelope.log_fields["monitor_score"] = f"{scores.monitor_score:g}"

    def trace_of(self, session: SessionInfo) -> list[Evaluation]:
        state = session.facts.get(_KEY)
        return list(state.trace or []) if isinstance(state, _SessionState) else []
