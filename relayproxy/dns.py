"""Asynchronous DNS on the configured nameservers (dns.nameservers), never blocking the loop."""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from .config import DNSConfig

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

_NOT_FOUND = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers)


def make_resolver(config: DNSConfig) -> dns.asyncresolver.Resolver:
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        # per-server ports must be known before the nameservers are set: dnspython binds them then
        resolver.nameserver_ports = {hp.host: hp.port for hp in config.nameservers}
        resolver.nameservers = [hp.host for hp in config.nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = config.timeout
    resolver.timeout = config.timeout
    return resolver


async def client_name(resolver: dns.asyncresolver.Resolver, ip: str) -> tuple[str, str]:
    """(name, ptr): the forward-confirmed reverse name of ip, as Postfix would verify it.

    name is the PTR name only when one of its A/AAAA records is ip again; otherwise
    [UNAVAILABLE], or [TEMPUNAVAIL] when DNS failed temporarily (XCLIENT's own vocabulary).
    """
    try:
        answer = await resolver.resolve_address(ip)
    except _NOT_FOUND:
        return UNAVAILABLE, ""
    except (dns.exception.DNSException, OSError):
        return TEMPUNAVAIL, ""
    ptr = str(answer[0].target).rstrip(".")
    if not ptr:
        return UNAVAILABLE, ""
    rdtype = "AAAA" if ":" in ip else "A"
    try:
        forward = await resolver.resolve(ptr, rdtype)
    except _NOT_FOUND:
        return UNAVAILABLE, ptr
    except (dns.exception.DNSException, OSError):
        return TEMPUNAVAIL, ptr
    confirmed = any(r.address == ip for r in forward)
    return (ptr if confirmed else UNAVAILABLE), ptr
