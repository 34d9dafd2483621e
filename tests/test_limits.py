"""Per-session memory stays bounded: against a client that never reads its replies, and
against a downstream that reads slowly (backpressure); half-closed clients get their replies."""

from __future__ import annotations

import socket
import threading
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


class _PausingDownstream:
    """A one-connection SMTP downstream that stops reading the message body until released:
    a slow mail server, for the proxy's backpressure."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.release = threading.Event()
        self.body_started = threading.Event()
        self.body = bytearray()
        self.final_dot = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        # small receive buffer: the kernel must not absorb the whole message for us
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn.settimeout(60)
        reader = conn.makefile("rb")
        conn.sendall(b"220 slow.test ESMTP\r\n")
        while line := reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-slow.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                reader.peek(1)
                self.body_started.set()
                self.release.wait(60)
                while chunk := reader.read1(65536):
                    self.body += chunk
                    if self.body.endswith(b"\r\n.\r\n"):
                        self.final_dot = True
                        conn.sendall(b"250 2.0.0 kept\r\n")
                        break
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                break
            else:
                conn.sendall(b"250 2.0.0 ok\r\n")
        conn.close()

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        self.thread.join(10)


def test_slow_downstream_slows_the_client_not_the_memory(
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    downstream = _PausingDownstream()
    try:
        proxy = proxy_factory(base_config(
            downstream.port, server={"max_message_size": 200_000_000},
            downstream={"xclient": False, "data_timeout": 60}))
        line = b"x" * 76 + b"\r\n"
        block = line * 13_000  # ~1 MB
        blocks = 64
        sent = 0
        client = socket.create_connection((proxy.host, proxy.port), timeout=60)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        reader = client.makefile("rb")
        assert reader.readline().startswith(b"220")
        for command in (b"EHLO c.test", b"MAIL FROM:<s@example.org>",
                        b"RCPT TO:<alice@relay.test>", b"DATA"):
            client.sendall(command + b"\r\n")
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            assert reply[:1] in (b"2", b"3"), (command, reply)

        def send_body() -> None:
            nonlocal sent
            for _ in range(blocks):
                client.sendall(block)
                sent += len(block)
            client.sendall(b".\r\n")

        sender = threading.Thread(target=send_body, daemon=True)
        with RssPeak(proxy.pid) as rss:
            sender.start()
            assert downstream.body_started.wait(20)
            # While the downstream reads nothing, the client must be held back: unchecked, the
            # 64 MB would all be taken (into the proxy's memory) well within this bound.
            sender.join(3)
            assert sender.is_alive(), "the whole 64 MB went out while the downstream read nothing"
            held_at = sent
            downstream.release.set()
            sender.join(60)
        assert not sender.is_alive()
        final = reader.readline()
        assert final.startswith(b"250 2.0.0 kept"), final
        client.close()
        assert downstream.final_dot
        assert len(downstream.body) > blocks * len(block)  # all of it, plus the Received header
        assert held_at < blocks * len(block) // 2, f"{held_at} octets went out before the stall"
        assert rss.growth_mib < 16, f"proxy RSS grew by {rss.growth_mib:.1f} MiB"
    finally:
        downstream.close()

