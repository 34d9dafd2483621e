"""What a check says about a stage of the conversation.

Checks never write replies; they return a Verdict (or None to let the stage go on) and
relayproxy.replies.for_verdict turns it into the SMTP reply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    REJECT = "reject"  # permanent: 5xx
    TEMPFAIL = "tempfail"  # try later: 4xx
    DISCONNECT = "disconnect"  # 421 and close the session


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str = ""
    code: int | None = None
    enhanced: str | None = None
    # Which part decided, for metrics and logs: "local" (built-in limits), "rule", ...
    source: str = "local"
    check: str = ""
    # decided before RCPT, it waits for the first RCPT (exempt recipients get through)
    defer: bool = False

    @classmethod
    def reject(cls, reason: str = "", code: int | None = None, enhanced: str | None = None,
               source: str = "local", check: str = "") -> Verdict:
        return cls(Action.REJECT, reason, code, enhanced, source, check)

    @classmethod
    def tempfail(cls, reason: str = "", code: int | None = None, enhanced: str | None = None,
                 source: str = "local", check: str = "") -> Verdict:
        return cls(Action.TEMPFAIL, reason, code, enhanced, source, check)
