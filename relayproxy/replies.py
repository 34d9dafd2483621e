"""SMTP replies: the proxy's own reply table and the one place that turns verdicts into replies.

Every reply the proxy writes itself is defined here (README.md "Reply codes" mirrors this
module); replies from the downstream are relayed as they came, via Reply.from_downstream.
All carry an enhanced status code (RFC 2034, RFC 3463).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .policy.verdict import Action, Verdict

_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str
    # A multi-line reply keeps its lines (enhanced codes included); text is their first line.
    lines: tuple[str, ...] = ()
    # Who decided, for metrics and logs: "local" (the proxy's own limits), "rule", "downstream"
    source: str = field(default="local", compare=False)

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text, source=self.source)

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def __str__(self) -> str:
        body = " | ".join(self.lines) if self.lines else f"{self.enhanced} {self.text}"
        return f"{self.code} {body}"

    def encode(self) -> bytes:
        if not self.lines:
            body = f"{self.enhanced} {self.text}" if self.enhanced else self.text
            return f"{self.code} {body}\r\n".encode("utf-8", "replace")
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            out.append(f"{self.code}{' ' if i == last else '-'}{line}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    @classmethod
    def from_downstream(cls, code: int, message: str) -> Reply:
        """Keep the downstream's code, enhanced code and text, multi-line replies included.

        If the downstream gave no enhanced code, one is derived from the reply class so the
        client still gets one (RFC 3463 x.0.0).
        """
        raw_lines = message.split("\n") if message else [""]
        first = raw_lines[0].split(" ", 1)
        if _ENHANCED.match(first[0]) and first[0][0] == str(code)[0]:
            enhanced, text = first[0], first[1] if len(first) > 1 else ""
            lines = tuple(raw_lines)
        else:
            enhanced, text = f"{str(code)[0]}.0.0", raw_lines[0]
            lines = tuple(
                line if _ENHANCED.match(line.split(" ", 1)[0]) else f"{enhanced} {line}"
                for line in raw_lines
            )
        return cls(code, enhanced, text, lines if len(lines) > 1 or lines[0] else (),
                   source="downstream")

    @classmethod
    def multiline(cls, code: int, lines: list[str]) -> Reply:
        """A multi-line reply without enhanced codes (the EHLO reply, RFC 2034)."""
        return cls(code, "", lines[0], tuple(lines))


def R(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text)


# Session and protocol replies.
RESET_OK = R(250, "2.0.0", "Reset OK")
NOOP_OK = R(250, "2.0.0", "OK")
BYE = R(221, "2.0.0", "Bye")
START_TLS = R(220, "2.0.0", "Ready to start TLS")
VRFY = R(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = R(214, "2.0.0", "See RFC 5321")

SYNTAX_ERROR = R(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = R(500, "5.5.2", "Line too long (512 octets max)")
BARE_LF_COMMAND = R(500, "5.5.2", "Bare LF in command; lines must end with CRLF")
HELO_TOO_LONG = R(501, "5.5.4", "HELO/EHLO name too long (255 octets max)")
PARAM_NOT_ASCII = R(501, "5.5.4", "MAIL/RCPT parameters must be ASCII")
PARAM_SYNTAX = R(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_CHARACTERS = R(
    501, "5.5.4", "Control characters (CR, LF, NUL, ...) are not allowed in commands"
)
NOT_IMPLEMENTED = R(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = R(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = R(503, "5.5.1", "Send HELO/EHLO first")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command")
NESTED_MAIL = R(503, "5.5.1", "Sender already specified")
NEED_RCPT = R(503, "5.5.1", "Need RCPT command")
NO_VALID_RCPT = R(554, "5.5.1", "No valid recipients")
PARAM_UNKNOWN = R(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
TLS_ALREADY = R(503, "5.5.1", "TLS already active")
STARTTLS_NO_ARGS = R(501, "5.5.4", "STARTTLS takes no arguments")

RELAY_DENIED = R(550, "5.7.1", "Relay access denied")
TOO_MANY_RCPTS = R(452, "4.5.3", "Too many recipients")
SIZE_EXCEEDED = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = R(552, "5.3.4", "Message header section exceeds fixed maximum size")
EIGHT_BIT_REFUSED = R(554, "5.6.3", "8-bit message content, but the downstream accepts 7-bit only")
CHECK_FAILED = R(451, "4.3.0", "Temporary failure in message checks, try again later")
DATA_LINE_TOO_LONG = R(500, "5.5.2", "Message line too long")
BARE_NEWLINE = R(550, "5.6.0", "Bare CR or LF in message; lines must end with CRLF")
START_DATA = R(354, "2.0.0", "End data with <CR><LF>.<CR><LF>")

PREGREET = R(554, "5.5.1", "Protocol error: you talked before the greeting")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = R(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = R(421, "4.7.0", "Too many connections from your address, try again later")
TIMEOUT = R(421, "4.4.2", "Timeout, closing connection")
INTERNAL_ERROR = R(421, "4.3.0", "Internal error, closing connection")
SHUTTING_DOWN = R(421, "4.3.2", "Service shutting down, try again later")

# Downstream faults: the text always says what failed and where.
DOWNSTREAM_BUSY = R(451, "4.3.2", "Too many downstream connections in use, try again later")


def downstream_unreachable(where: str) -> Reply:
    return R(451, "4.4.1", f"downstream {where} unreachable")


def downstream_failed(where: str, stage: str, what: str) -> Reply:
    return R(451, "4.4.2", f"downstream {where} {what} during {stage}")


def downstream_closing(where: str) -> Reply:
    return R(421, "4.4.2", f"downstream {where} lost, closing connection")


def downstream_no_smtputf8(where: str) -> Reply:
    return R(553, "5.6.7", f"downstream {where} does not support SMTPUTF8")


def downstream_tls_required(where: str) -> Reply:
    return R(451, "4.7.5", f"downstream {where} does not offer required TLS")


def greeting(hostname: str) -> Reply:
    # RFC 5321 4.2: the banner has no enhanced code (RFC 2034 applies to replies to commands).
    return Reply(220, "", f"{hostname} ESMTP")


def helo_ok(hostname: str) -> Reply:
    return Reply(250, "", hostname)


def sender_ok(sender: str) -> Reply:
    return R(250, "2.1.0", f"Sender <{sender}> OK")


def downstream_refused_identity(where: str) -> Reply:
    return R(451, "4.7.0",
             f"downstream {where} refused the client identity (XCLIENT), try again later")


def downstream_no_dsn(where: str) -> Reply:
    return R(555, "5.5.4", f"downstream {where} does not support DSN parameters")


def path_error(keyword: str, reason: str) -> Reply:
    what = "sender" if keyword == "FROM" else "recipient"
    return R(501, "5.1.7" if keyword == "FROM" else "5.1.3", f"Bad {what} address syntax: {reason}")


# The one place that turns check verdicts into replies.
_DEFAULTS: dict[Action, tuple[int, str, str]] = {
    Action.REJECT: (550, "5.7.1", "Rejected by policy"),
    Action.TEMPFAIL: (451, "4.7.1", "Temporarily rejected by policy, try again later"),
    Action.DISCONNECT: (421, "4.7.0", "Closing connection by policy"),
}


def for_verdict(verdict: Verdict) -> Reply:
    """The reply for a refusing verdict. A verdict may name its own code; its class is kept."""
    code, enhanced, text = _DEFAULTS[verdict.action]
    if verdict.code is not None:
        code = verdict.code
    if verdict.enhanced is not None:
        enhanced = verdict.enhanced
    return Reply(code, enhanced, verdict.reason or text, source=verdict.source)
