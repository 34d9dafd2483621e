"""The transaction record: what one MAIL..end-of-data exchange did, as one log line and metrics.

Each transaction gives exactly one log line (logfmt or JSON, relayproxy.logformat) with
event=transaction when it ends (delivered, refused, reset, or cut off), and counts in
relayproxy_messages_total once it reached DATA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from . import metrics
from .checks import Envelope, SessionInfo
from .replies import Reply

txlog = logging.getLogger("relayproxy.transaction")


def outcome_of(reply: Reply) -> str:
    """The metrics/log word for a reply: accepted, tempfailed or rejected."""
    return "accepted" if reply.code < 400 else "tempfailed" if reply.code < 500 else "rejected"


@dataclass(slots=True)
class Transaction:
    envelope: Envelope
    started: float = field(default_factory=time.monotonic)
    rcpt_log: list[str] = field(default_factory=list)
    rcpt_params: list[dict[str, str | None]] = field(default_factory=list)  # of each recipient
    size: int = 0
    data_started: bool = False
    downstream: str = ""  # the server that got it, once one did
    # a refusal of the downstream MAIL (or no downstream to be had): the answer to every RCPT
    refusal: Reply | None = None
    done: bool = False

    def recipient(self, address: str, reply: Reply) -> None:
        key = (outcome_of(reply), reply.source)
        child = metrics.RECIPIENTS_BY.get(key) or metrics.RECIPIENTS.labels(*key)
        child.inc()
        self.rcpt_log.append(f"<{address}>={reply.code}")

    def end(self, session: SessionInfo, reply: Reply | None, outcome: str = "") -> None:
        """Record the end, once: outcome is derived from reply unless given (aborted)."""
        if self.done:
            return
        self.done = True
        outcome = outcome or (outcome_of(reply) if reply is not None else "aborted")
        if self.data_started:
            metrics.MESSAGES_BY[outcome].inc()
        if not txlog.isEnabledFor(logging.INFO):
            return
        fields = {
            "event": "transaction",
            "session": session.session_id,
            "client": f"{session.client_ip}:{session.client_port}",
            "helo": session.helo,
            "from": f"<{self.envelope.sender}>",
            "rcpts": ",".join(self.rcpt_log),
            "size": self.size,
            "downstream": self.downstream,
            "reply": str(reply) if reply else "",
            "outcome": outcome,
            "duration_ms": f"{(time.monotonic() - self.started) * 1000:.1f}",
            **self.envelope.log_fields,
        }
        # the formatter (relayproxy.logformat) writes the fields as logfmt or JSON keys
        txlog.info("transaction", extra={"fields": fields})
