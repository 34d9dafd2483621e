"""PROXY protocol headers written by the tests themselves (HAProxy's proxy-protocol.txt)."""

from __future__ import annotations

import ipaddress
import struct

from .proxy import ProxyProcess
from .smtpclient import RawSMTP
from .wait import wait_until

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, source_port: int, dest: str | None = None, dest_port: int = 25) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = dest or ("2001:db8::1" if family == "TCP6" else "192.0.2.1")
    return f"PROXY {family} {source} {dest} {source_port} {dest_port}\r\n".encode()


def v2(source: str, source_port: int, dest: str | None = None, dest_port: int = 25,
       tlv: bytes = b"") -> bytes:
    """A v2 PROXY command over TCP (INET or INET6 by the source's family)."""
    src = ipaddress.ip_address(source)
    if src.version == 4:
        dst = ipaddress.ip_address(dest or "192.0.2.1")
        body = struct.pack("!4s4sHH", src.packed, dst.packed, source_port, dest_port)
        family = 0x11  # AF_INET, STREAM
    else:
        dst = ipaddress.ip_address(dest or "2001:db8::1")
        body = struct.pack("!16s16sHH", src.packed, dst.packed, source_port, dest_port)
        family = 0x21  # AF_INET6, STREAM
    body += tlv
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


def v2_local() -> bytes:
    """The LOCAL command (a load balancer's own health check): no addresses."""
    return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)


def proxied(host: str, port: int, header: bytes, timeout: float = 10) -> RawSMTP:
    """An SMTP client that has sent header; the greeting is not read yet."""
    client = RawSMTP(timeout)
    client.connect(host, port, read_greeting=False)
    client.send(header)
    return client


def wait_ready(proxy: ProxyProcess, timeout: float = 15) -> ProxyProcess:
    """Wait until a proxy with server.proxy_protocol answers 220 after a LOCAL header (its
    own readiness probe sends none, and would be closed)."""
    def greets() -> bool:
        try:
            with proxied(proxy.host, proxy.port, v2_local(), timeout=2) as client:
                return client.read_reply().code == 220
        except OSError:
            return False

    wait_until(greets, f"the proxy on {proxy.host}:{proxy.port} to greet after a LOCAL header",
               timeout, interval=0.05, describe=proxy.log_tail,
               abort=lambda: None if proxy.returncode is None else "the proxy exited")
    return proxy
