"""`relayproxy test-message`: the whole policy run offline on one message, no downstream.

The checks see what they would see in a session: connect, HELO, MAIL, each RCPT (as if the
downstream accepted it), the header section, the body in chunks, the end of data. DNS goes
through the configured resolver. The result lists every rule evaluated, hit or not, and the
verdict with the exact reply a client would get.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field, replace

from . import dns as rdns
from . import metrics
from .checks import Envelope, MessageInfo, Pipeline, SessionInfo
from .config import Config, StateConfig
from .dotreader import Unstuffer, stuff
from .headers import HeaderSection, find_end
from .policy.engine import Evaluation, RulesCheck
from .replies import Reply, for_verdict
from .runtime import build_runtime

CHUNK = 64 * 1024
EXIT_CODES = {"accept": 0, "reject": 1, "tempfail": 2}


@dataclass(slots=True)
class Result:
    verdict: str  # accept | reject | tempfail
    reply: str
    stage: str  # where it was decided
    score: float = 0.0
    rules: list[Evaluation] = field(default_factory=list)
    recipients: dict[str, str] = field(default_factory=dict)  # address -> reply
    added_headers: list[str] = field(default_factory=list)
    # the content scanners' results as on the transaction log line (clamd=..., rspamd_score=..)
    scanners: dict[str, str] = field(default_factory=dict)
    auth: list[str] = field(default_factory=list)  # the authentication results ([auth])

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rules": [asdict(r) for r in self.rules]}, indent=2)

    def to_text(self) -> str:
        lines = [f"{'rule':32} {'stage':8} {'hit':7} {'action':10} score"]
        for r in self.rules:
            hit = "unknown" if r.hit is None else "yes" if r.hit else "no"
            lines.append(f"{r.name:32} {r.stage:8} {hit:7} {r.action or '-':10} "
                         f"{r.score:g}")
        for address, reply in self.recipients.items():
            lines.append(f"RCPT <{address}>: {reply}")
        lines += [f"auth: {clause}" for clause in self.auth]
        lines += [f"added header: {h}" for h in self.added_headers]
        lines += [f"scanner {k}: {v}" for k, v in self.scanners.items()]
        lines.append(f"score: {self.score:g}")
        lines.append(f"verdict: {self.verdict} at {self.stage}: {self.reply}")
        return "\n".join(lines)


def _auth_methods(auth: object) -> list[str]:
    """The authentication results as test-message prints them ([] without [auth])."""
    if auth is None:
        return []
    from .auth.results import AuthResults  # imported only when [auth] is on

    return auth.methods() if isinstance(auth, AuthResults) else []


def _verdict_word(reply: Reply) -> str:
    return "accept" if reply.code < 400 else "tempfail" if reply.code < 500 else "reject"


async def run(config: Config, client_ip: str, helo: str, sender: str,
              recipients: list[str], message: bytes) -> Result:
    # a trial never counts towards the live proxies' limits nor reads their blocks: state in
    # this process, whatever state.redis_url says
    runtime = build_runtime(replace(config, state=StateConfig()), trace=True)
    pipeline = runtime.pipeline
    rules = next((c for c in pipeline.checks if isinstance(c, RulesCheck)), None)
    session = SessionInfo("offline", client_ip, 0, helo=helo, esmtp=True)

    async def name() -> str:
        if not config.server.reverse_dns:
            return rdns.UNAVAILABLE
        return (await runtime.names.lookup(client_ip))[0]

    if config.server.reverse_dns:
        session.name_lookup = name

    def result(stage: str, reply: Reply, envelope: Envelope | None = None) -> Result:
        score = 0.0
        if envelope is not None and "score" in envelope.log_fields:
            score = float(envelope.log_fields["score"])
        return Result(_verdict_word(reply), str(reply), stage, score,
                      rules.trace_of(session) if rules else [])

    stages = (("connect", pipeline.connect(session)), ("helo", pipeline.helo(session)))
    for stage, call in stages:
        if (verdict := await call) is not None:
            return result(stage, for_verdict(verdict))
    envelope = Envelope(sender)
    if (verdict := await pipeline.mail(session, envelope)) is not None:
        out = result("mail", for_verdict(verdict), envelope)
        auth = envelope.facts.get("auth")
        out.auth = _auth_methods(auth)
        return out
    replies: dict[str, str] = {}
    for address in recipients:
        verdict = await pipeline.rcpt(session, envelope, address)
        reply = for_verdict(verdict) if verdict else Reply(250, "2.1.5", "Ok")
        replies[address] = str(reply)
        if verdict is None:
            envelope.recipients.append(address)
    if not envelope.recipients:
        last = for_verdict(verdict) if verdict else Reply(554, "5.5.1", "No valid recipients")
        out = result("rcpt", last, envelope)
        out.recipients = replies
        return out
    out = await _data(pipeline, session, envelope, message)
    out.recipients = replies
    return out


async def _data(pipeline: Pipeline, session: SessionInfo, envelope: Envelope,
                message: bytes) -> Result:
    rules = next((c for c in pipeline.checks if isinstance(c, RulesCheck)), None)
    wire = stuff(b"\r\n".join(message.replace(b"\r\n", b"\n").split(b"\n")))
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    end, body_start = find_end(wire) or (len(wire), len(wire))
    headers = HeaderSection.parse(wire[:end], wire[end:body_start])
    info = MessageInfo(len(wire), headers=headers)
    verdict = await pipeline.headers(session, envelope, headers)
    if verdict is None:
        observers = pipeline.observers(session, envelope)
        body = Unstuffer()(wire[body_start:])
        for offset in range(0, len(body), CHUNK):
            for watch in observers:
                await watch.observer.feed(body[offset : offset + CHUNK])
        # every observer ends (a scanner answers and closes its connection), the first
        # refusal counts
        ends = [await watch.observer.end(info) for watch in observers]
        verdict = next((v for v in ends if v is not None), None)
        verdict = verdict or await pipeline.data_end(session, envelope, info)
    reply = for_verdict(verdict) if verdict else Reply(250, "2.0.0", "Ok (not delivered: "
                                                       "test-message has no downstream)")
    score = float(envelope.log_fields.get("score", 0))
    added = [h.decode("utf-8", "replace").rstrip("\r\n") for h in headers.prepended]
    scanners = {k: v for k, v in envelope.log_fields.items()
                if k.partition("_")[0] in metrics.SCANNERS}
    auth = envelope.facts.get("auth")
    return Result(_verdict_word(reply), str(reply), "data", score,
                  rules.trace_of(session) if rules else [], added_headers=added,
                  scanners=scanners,
                  auth=_auth_methods(auth))


def run_sync(config: Config, client_ip: str, helo: str, sender: str,
             recipients: list[str], message: bytes) -> Result:
    return asyncio.run(run(config, client_ip, helo, sender, recipients, message))
