"""Per-session memory stays bounded against a client that never reads its replies."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.wait import wait_until


def _vmrss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def test_client_that_never_reads_replies_is_bounded_and_dropped(
    proxy_factory: Callable[..., ProxyProcess],
    scripted: Callable[..., ScriptedDownstream],
) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, server={"idle_timeout": 1}))
    baseline = _vmrss_kib(proxy.pid)
    # Up to 60 MB of pipelined NOOPs, never reading a reply: each would be answered with 17 octets.
    flood = b"NOOP\r\n" * 100_000
    sent = 0
    sock = socket.create_connection((proxy.host, proxy.port))
    sock.settimeout(3)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            with contextlib.suppress(OSError, AssertionError):
                peak = max(peak, _vmrss_kib(proxy.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
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
    finally:
        done.set()
        sampler.join(5)
        sock.close()
    assert sent < len(flood) * 100, "the proxy never pushed back on the flood"
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 16, f"proxy RSS grew by {growth_mib:.1f} MiB (sent {sent} octets)"
    assert downstream.connections == 0
