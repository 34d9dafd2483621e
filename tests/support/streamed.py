"""The streamed verifications' common steps in the unit tests: keys fetched through the
proxy's async resolver, and a body fed in pieces."""

from __future__ import annotations

import asyncio

from relayproxy.auth.dkim import BodyHashes
from relayproxy.auth.lookup import TempDNSError, txt
from relayproxy.config import DNSConfig, HostPort
from relayproxy.dns import make_resolver


def fetch_keys(names: list[str], host: str, port: int, dns_timeout: float
               ) -> dict[str, list[bytes] | None]:
    """Each name's TXT records from the server at host:port (None: the lookup failed)."""
    resolver = make_resolver(DNSConfig(nameservers=(HostPort(host, port),),
                                       timeout=dns_timeout))

    async def keys() -> dict[str, list[bytes] | None]:
        found: dict[str, list[bytes] | None] = {}
        for name in names:
            try:
                found[name] = await txt(resolver, name)
            except TempDNSError:
                found[name] = None
        return found

    return asyncio.run(asyncio.wait_for(keys(), 10))


def feed_body(hashes: BodyHashes, body: bytes, cuts: list[int]) -> None:
    """The body fed in pieces cut at cuts (each modulo the body's length + 1), then ended."""
    prev = 0
    for cut in [*sorted(c % (len(body) + 1) for c in cuts), len(body)]:
        hashes.feed(body[prev:cut])
        prev = max(prev, cut)
    hashes.end()
