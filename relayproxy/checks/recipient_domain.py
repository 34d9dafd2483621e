"""RCPT: only domains the proxy fronts are accepted; everything else is relay denied."""

from __future__ import annotations

from ..address import PathError, ascii_domain
from ..policy.verdict import Verdict
from .base import Check, Envelope, SessionInfo


def domain_of(address: str) -> str:
    """The domain of a parsed address (relayproxy.address), in lower-case A-label form, so
    "bücher.example" and "xn--bcher-kva.example" are the same domain to accept_domains."""
    if "@" not in address:
        return ""
    domain = address.rpartition("@")[2]
    try:
        return ascii_domain(domain)
    except PathError:
        return domain.lower()


class AcceptDomains(Check):
    name = "accept_domains"
    instant = True

    def __init__(self, domains: tuple[str, ...]):
        self.exact = frozenset(d for d in domains if not d.startswith("."))
        self.suffixes = tuple(d for d in domains if d.startswith("."))

    def accepts(self, address: str) -> bool:
        domain = domain_of(address)
        if not domain:
            # RFC 5321 4.5.1: <postmaster> without a domain must be accepted.
            return address.lower() == "postmaster"
        return domain in self.exact or domain.endswith(self.suffixes)

    async def on_rcpt(
        self, session: SessionInfo, envelope: Envelope, recipient: str
    ) -> Verdict | None:
        if self.accepts(recipient):
            return None
        return Verdict.reject(
            f"<{recipient}>: Relay access denied", 550, "5.7.1", check=self.name
        )
