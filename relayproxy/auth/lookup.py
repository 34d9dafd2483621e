"""DNS answers for the authentication methods, from the shared async resolver.

The libraries (pyspf, dkimpy) are synchronous: they are handed answers fetched here, never a
resolver of their own, so every query goes to dns.nameservers and none blocks the event loop.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

# a name that cannot exist (an empty or overlong label) has no records either
_NOT_FOUND = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.name.EmptyLabel,
              dns.name.LabelTooLong, dns.name.NameTooLong)


class TempDNSError(Exception):
    """A lookup failed for now (timeout, SERVFAIL, refused): temperror, not "none"."""


async def txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[bytes]:
    """The TXT records of name, each record's strings joined; [] when there are none."""
    try:
        answer = await resolver.resolve(name, "TXT")
    except _NOT_FOUND:
        return []
    except (dns.exception.DNSException, OSError) as exc:
        raise TempDNSError(f"{name}: {exc}") from None
    return [b"".join(r.strings) for r in answer]
