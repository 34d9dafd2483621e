"""The PROXY protocol (HAProxy's proxy-protocol.txt, v1 text and v2 binary) on the listener.

With server.proxy_protocol on, a load balancer in front of the proxy opens each connection
with a header naming the real client; that address then is the session's client address for
everything (connection limits, rules, limits, the Received field, XCLIENT, logs). The header
comes before anything else, so it is read before the banner and before server.greet_delay,
within server.proxy_timeout. Only peers in server.proxy_trusted may send one: from anyone else
a header would let a client choose its own address. Every failure closes the connection
without a word (the peer is a load balancer or a stranger, not an SMTP client) and is counted
by kind: untrusted (the peer is not a trusted network), missing (the first bytes are no PROXY
signature), malformed, truncated (the peer closed mid-header) or timeout.

The parsing is aiosmtpd's (aiosmtpd.proxy_protocol.get_proxy); this module gives it a bounded
reader over the connection's buffer (a v1 line is at most 107 octets, the spec's limit) and
decides what a parsed header means:
  - v2 LOCAL (the load balancer's own health check), v1 UNKNOWN, v2 UNSPEC or UNIX: the
    connection keeps its own address, as the spec says;
  - PROXY over TCP (v1 TCP4/TCP6, v2 INET/INET6 STREAM): the source address and port; an
    IPv4-mapped IPv6 source is taken as IPv4;
  - anything else (UDP, a bad signature, version or address) is malformed.
Bytes after the header (a client that talks at once) stay buffered for the session.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Awaitable, Iterable

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, ProxyData, get_proxy

from .connection import ClientConnection

V1_MAX = 107  # octets of a v1 line, CRLF included (proxy-protocol.txt 2.1)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(Exception):
    """The connection gave no usable PROXY header; kind is the metrics label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@functools.lru_cache(maxsize=8)
def trusted_networks(items: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks of server.proxy_trusted (validated by the configuration)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener sees IPv4 peers this way
    return address


def is_trusted(ip: str, networks: Iterable[Network]) -> bool:
    address = _address(ip)
    return address is not None and any(address in network for network in networks)


class _Reader:
    """aiosmtpd's AsyncReader over the connection's buffer; remembers whether the peer
    closed, so that a cut-off header is told from a malformed one."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.closed = False

    async def _read(self, read: Awaitable[bytes]) -> bytes:
        try:
            return await read
        except ConnectionResetError:
            self.closed = True
            raise

    async def read(self, n: int = -1) -> bytes:
        return await self._read(self.connection.read_some(n if n > 0 else V1_MAX))

    async def readexactly(self, n: int) -> bytes:
        return await self._read(self.connection.read_exactly(n))

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        # the 5 octets of "PROXY" are read already
        return await self._read(self.connection.read_until(separator, V1_MAX - 5))


async def read_header(connection: ClientConnection, trusted: Iterable[Network],
                      timeout: float) -> tuple[str, int] | None:
    """The real client's (address, port) from the connection's PROXY header, or None when
    the connection keeps its own address (LOCAL, UNKNOWN). Raises ProxyHeaderError."""
    peer = connection.peer[0]
    if not is_trusted(peer, trusted):
        raise ProxyHeaderError("untrusted", f"{peer} is not in server.proxy_trusted")
    reader = _Reader(connection)
    try:
        async with asyncio.timeout(timeout):
            data = await get_proxy(reader)
    except TimeoutError:
        raise ProxyHeaderError("timeout", f"no PROXY header within {timeout:g}s") from None
    except ConnectionResetError:
        if connection.discard_buffered() == 0:
            raise ProxyHeaderError("missing", "closed without a PROXY header") from None
        raise ProxyHeaderError("truncated", "closed in the middle of the PROXY header") from None
    if data.error:
        if reader.closed:
            raise ProxyHeaderError("truncated", "closed in the middle of the PROXY header")
        if data.version is None and "signature" in data.error:
            raise ProxyHeaderError("missing", "no PROXY header")
        raise ProxyHeaderError("malformed", data.error)
    return _source(data)


def _source(data: ProxyData) -> tuple[str, int] | None:
    if data.version == 2 and data.command == V2_CMD.LOCAL:
        return None
    if data.family in (AF.UNSPEC, AF.UNIX):
        return None
    if data.protocol != PROTO.STREAM:
        raise ProxyHeaderError("malformed", "PROXY header for another protocol than TCP")
    source = data.src_addr
    port = data.src_port
    if not isinstance(source, ipaddress.IPv4Address | ipaddress.IPv6Address) or port is None:
        raise ProxyHeaderError("malformed", "PROXY header without a source address")
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped
    return str(source), int(port)
