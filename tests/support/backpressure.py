"""A large message sent while something inside the proxy stops reading (a stalled body
observer, a scanner that reads nothing): the client must be slowed, not buffered for."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .procstat import RssPeak
from .proxy import ProxyProcess
from .smtpclient import RawSMTP

TOTAL = 40 * 1024 * 1024


def stalled_delivery(proxy: ProxyProcess, release: Callable[[], None], stalled: str,
                     helo: str = "client.example.org", total: int = TOTAL) -> None:
    """Send `total` body octets while `stalled` holds the stream; assert the client blocked
    early with the proxy's RSS flat, call release(), and assert the message then ends in 250."""
    block = (b"y" * 958 + b"\r\n") * 64  # 60 KiB
    pushed = 0
    blocked = threading.Event()
    finished = threading.Event()
    failure: list[BaseException] = []
    client = RawSMTP(timeout=30)
    client.connect(proxy.host, proxy.port)
    client.ehlo(helo)
    assert client.cmd("MAIL FROM:<s@example.org>").code == 250
    assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
    assert client.cmd("DATA").code == 354
    assert client.sock is not None
    sock = client.sock

    def push() -> None:
        nonlocal pushed
        try:
            sock.sendall(b"Subject: stalled\r\n\r\n")
            view = memoryview(block)
            while pushed < total:
                sock.settimeout(0.5)
                try:
                    sent = sock.send(view[pushed % len(block):])
                except TimeoutError:
                    blocked.set()  # the proxy stopped reading: backpressure reached us
                    continue
                pushed += sent
            sock.settimeout(30)
            sock.sendall(b".\r\n")
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            finished.set()

    with RssPeak(proxy.pid) as rss:
        sender = threading.Thread(target=push, daemon=True)
        sender.start()
        assert blocked.wait(30), f"the client never blocked; pushed {pushed} of {total}"
        assert pushed < total // 2, f"{pushed} octets taken while {stalled} read nothing"
        stalled_growth = rss.growth_mib
        release()
        assert finished.wait(60), f"the client could not finish once {stalled} read again"
    assert not failure, failure
    assert stalled_growth < 16, f"RSS grew {stalled_growth:.1f} MiB behind {stalled}"
    with client:
        reply = client.read_reply()
        assert reply.code == 250, reply
        client.cmd("QUIT")
