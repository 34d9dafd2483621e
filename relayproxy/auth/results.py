"""The Authentication-Results field (RFC 8601) and the forged ones that claim our name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .arc import ARCResult
from .dkim import DKIMResult
from .dmarc import DMARCResult
from .spf import SPFResult

# RFC 8601 2.2: the authserv-id is the first token, before ";" or a comment
_AUTHSERV = re.compile(r"^\s*(?:\([^)]*\)\s*)*([^\s;(]+)")
_FOLD = ";\r\n\t"  # between two clauses: each on a line of its own
# a value the field may carry as written (RFC 2045 token); anything else is quoted
_TOKEN = re.compile(r"^[!#$%&'*+.0-9A-Z^_`a-z{|}~@-]+$")


def authserv_id(value: str) -> str:
    m = _AUTHSERV.match(value)
    return m.group(1).lower() if m else ""


def aar_authserv_id(value: str) -> str:
    """The authserv-id of an ARC-Authentication-Results value ("i=N; id; ...")."""
    return authserv_id(value.partition(";")[2])


def _quoted(text: str) -> str:
    # ASCII letters and digits are a token without the pattern (str.isalnum() alone takes
    # any script's)
    if (text.isascii() and text.isalnum()) or _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# domains and selectors come back message after message: kept (a message's own values, such
# as header.b, are quoted without keeping them)
_value = lru_cache(maxsize=4096)(_quoted)


@dataclass(slots=True)
class AuthResults:
    """What the methods found for one transaction; None: not computed (yet)."""

    spf: SPFResult | None = None
    dkim: list[DKIMResult] | None = None
    dmarc: DMARCResult | None = None
    arc: ARCResult | None = None
    notes: list[str] = field(default_factory=list)  # overrides, for the log

    @property
    def dkim_summary(self) -> str:
        """One word for rules and logs: pass if any signature passed, else the first's."""
        if self.dkim is None:
            return ""
        if not self.dkim:
            return "none"
        if any(r.result == "pass" for r in self.dkim):
            return "pass"
        return self.dkim[0].result

    def methods(self) -> list[str]:
        """The resinfo clauses (RFC 8601 2.2) of what was computed, in the usual order."""
        out = []
        if self.spf is not None:
            prop = "smtp.helo" if self.spf.identity == "helo" else "smtp.mailfrom"
            out.append(f"spf={self.spf.result} {prop}={_value(self.spf.domain or 'unknown')}")
        if self.dkim is not None:
            if not self.dkim:
                out.append("dkim=none")
            for r in self.dkim:
                clause = f"dkim={r.result}"
                if r.reason and r.result != "pass":
                    clause += f" ({_comment(r.reason)})"
                if r.domain:
                    clause += f" header.d={_value(r.domain)}"
                if r.selector:
                    clause += f" header.s={_value(r.selector)}"
                if r.b:
                    clause += f" header.b={_quoted(r.b)}"
                out.append(clause)
        if self.arc is not None:
            clause = f"arc={self.arc.result}"
            if self.arc.sealer:
                clause += f" (i={self.arc.instance} d={self.arc.sealer})"
            out.append(clause)
        if self.dmarc is not None:
            clause = f"dmarc={self.dmarc.result}"
            if self.dmarc.published:
                clause += f" (p={self.dmarc.published} dis={self.dmarc.policy or 'none'})"
            out.append(clause + f" header.from={_value(self.dmarc.domain or 'unknown')}")
        return out

    def field(self, authserv: str) -> bytes:
        """The whole Authentication-Results field, folded, CRLF-ended."""
        clauses = self.methods() or ["none"]
        text = f"Authentication-Results: {authserv};\r\n\t{_FOLD.join(clauses)}\r\n"
        return text.encode("ascii", "replace")

    def log_fields(self) -> dict[str, str]:
        out = {}
        if self.spf is not None:
            out["spf"] = self.spf.result
        dkim = self.dkim
        if dkim is not None:
            out["dkim"] = (f"{dkim[0].result}:{dkim[0].domain}" if len(dkim) == 1  # the usual
                           else ",".join([f"{r.result}:{r.domain}" for r in dkim]) or "none")
        if self.dmarc is not None:
            out["dmarc"] = self.dmarc.result + (f":{self.dmarc.policy}"
                                                if self.dmarc.result != "pass"
                                                and self.dmarc.policy else "")
        if self.arc is not None:
            out["arc"] = self.arc.result
        if self.notes:
            out["auth_notes"] = ",".join(self.notes)
        return out


def _comment(text: str) -> str:
    clean = "".join(c if c.isprintable() and c not in "()\\" else " " for c in text)
    return clean[:80].strip()
