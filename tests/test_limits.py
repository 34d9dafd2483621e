"""Per-session memory stays bounded against a client that never reads its replies."""

from __future__ import annotations

import socket
from collections.abc import Callable

from support.procstat import RssPeak
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.wait import wait_until


def test_client_that_never_reads_replies_is_bounded_and_dropped(
    proxy_factory: Callable[..., ProxyProcess],
    scripted: Callable[..., ScriptedDownstream],
) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, server={"idle_timeout": 1}))
    # Up to 60 MB of pipelined NOOPs, never reading a reply: each would be answered with 17 octets.
    flood = b"NOOP\r\n" * 100_000
    sent = 0
    # The baseline is taken before the connection, so the session's own memory counts as growth.
    with RssPeak(proxy.pid) as rss, socket.create_connection((proxy.host, proxy.port)) as sock:
        sock.settimeout(3)
        for _ in range(100):
            try:
                sock.sendall(flood)
            except (TimeoutError, OSError):
                break  # the proxy stopped reading (backpressure), or hung up on us
            sent += len(flood)
        # The proxy gives up on a client that does not take its replies: idle_timeout, then
        # the close is forced when the last replies cannot be flushed either.
        wait_until(lambda: proxy.metric("relayproxy_sessions_active") == 0,
                   "the flooding session to be closed", timeout=20)
    assert sent < len(flood) * 100, "the proxy never pushed back on the flood"
    assert rss.growth_mib < 16, f"proxy RSS grew by {rss.growth_mib:.1f} MiB (sent {sent} octets)"
    assert downstream.connections == 0


def test_half_closed_client_still_gets_its_replies(
    proxy_factory: Callable[..., ProxyProcess],
    scripted: Callable[..., ScriptedDownstream],
) -> None:
    # e.g. `printf '...' | nc host 25`: nc shuts its sending side once its input is sent
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port))
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        # MAIL waits for the downstream, so the EOF arrives while commands are still pending
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<s@example.org>\r\nRSET\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    codes = [line[:4] for line in received.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220 ", b"250 ", b"250 ", b"250 ", b"221 "], received
