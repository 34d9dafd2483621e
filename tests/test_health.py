"""Issue 9 point 5: /healthz, /readyz and /metrics on the metrics listener, served by the event
loop, and the active downstream probe (relayproxy_downstream_up, mark down and up again).

The downstreams are scripted servers stopped and started again on the same port, so the probe
meets a real refused connection and a real greeting.
"""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from support.proxy import PROJECT_ROOT, ProxyProcess, base_config, split_hostport
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP, send_message
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]

# Probes every 0.2 s with short timeouts; down_time far longer than any test, so a server
# that takes traffic again within a test was marked up by the probe, not by the clock.
FAST_PROBE = {"probe_interval": 0.2, "connect_timeout": 1, "command_timeout": 2,
              "down_time": 600}


def _url(proxy: ProxyProcess, path: str) -> str:
    return proxy.metrics_url.removesuffix("/metrics") + path


def get(proxy: ProxyProcess, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request to the proxy's metrics listener."""
    request = urllib.request.Request(_url(proxy, path), method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def raw_request(proxy: ProxyProcess, data: bytes) -> bytes:
    """Send data as it is; return everything the endpoint answers before it closes."""
    host, port = split_hostport(proxy.config["metrics"]["listen"])
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_ready(proxy: ProxyProcess, expected: int, timeout: float = 10) -> bytes:
    last: list[tuple[int, str, bytes]] = []

    def answered() -> bytes | None:
        last[:] = [get(proxy, "/readyz")]
        return last[0][2] if last[0][0] == expected else None

    return wait_until(answered, f"/readyz to answer {expected}", timeout,
                      interval=0.05, describe=lambda: f"last: {last}\n{proxy.log_tail()}")


def wait_up(proxy: ProxyProcess, server: ScriptedDownstream, expected: float) -> None:
    labels = {"server": server.address}
    wait_until(lambda: proxy.metric("relayproxy_downstream_up", labels) == expected,
               f"relayproxy_downstream_up{labels} == {expected}", 10, interval=0.05,
               describe=proxy.log_tail)


def test_healthz_and_unknown_paths(scripted: ScriptedFactory, proxy_factory: ProxyFactory
                                   ) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, downstream=FAST_PROBE))
    assert get(proxy, "/healthz") == (200, "text/plain; charset=utf-8", b"alive\n")
    assert get(proxy, "/nope")[0] == 404
    assert get(proxy, "/")[0] == 404
    assert get(proxy, "/metricsx")[0] == 404
    assert get(proxy, "/healthz", "POST")[0] == 405
    status, content_type, body = get(proxy, "/metrics?name[]=x")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert b"relayproxy_sessions_active" in body
    head = raw_request(proxy, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
    assert raw_request(proxy, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    # a request larger than the limit is refused, not buffered
    huge = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    assert raw_request(proxy, huge).startswith(b"HTTP/1.1 431 ")
    # the endpoint still serves after all that
    assert get(proxy, "/healthz")[0] == 200


def test_readyz_follows_the_downstream(scripted: ScriptedFactory, proxy_factory: ProxyFactory
                                       ) -> None:
    downstream = scripted()
    port = downstream.port
    proxy = proxy_factory(base_config(port, downstream=FAST_PROBE))
    assert wait_ready(proxy, 200) == b"ready\n"
    wait_up(proxy, downstream, 1)

    downstream.stop()
    body = wait_ready(proxy, 503)
    assert body.startswith(b"not ready: no downstream answered a probe"), body
    wait_up(proxy, downstream, 0)
    assert get(proxy, "/healthz")[0] == 200  # alive, only not ready
    proxy.wait_for_log(f"downstream {downstream.address} is down")

    back = scripted(port=port)
    assert wait_ready(proxy, 200) == b"ready\n"
    wait_up(proxy, back, 1)
    proxy.wait_for_log(f"downstream {back.address} is up again")


def test_probe_marks_a_server_up_again_before_its_down_time(
        scripted: ScriptedFactory, proxy_factory: ProxyFactory) -> None:
    """Two servers in failover order: while the first is down, mail goes to the second; once
    the probe hears the first again, mail goes to it, though its down_time (600 s) is not
    over: the mark-up came from the probe."""
    first, second = scripted(), scripted()
    port = first.port
    # without reuse: an idle connection to the second server would carry the next message
    proxy = proxy_factory(base_config([first.port, second.port],
                                      downstream={**FAST_PROBE, "reuse_connections": False}))
    wait_up(proxy, first, 1)
    first.stop()
    wait_up(proxy, first, 0)
    assert wait_ready(proxy, 200) == b"ready\n"  # one answering server is enough

    replies = send_message(proxy.host, proxy.port, "a@example.org", ["alice@relay.test"],
                           b"Subject: one\r\n\r\nbody\r\n")
    assert replies["dot"].code == 250, replies
    assert len(second.wait_for_messages(1)) == 1

    first = scripted(port=port)
    wait_up(proxy, first, 1)
    replies = send_message(proxy.host, proxy.port, "a@example.org", ["alice@relay.test"],
                           b"Subject: two\r\n\r\nbody\r\n")
    assert replies["dot"].code == 250, replies
    assert len(first.wait_for_messages(1)) == 1
    assert len(second.messages) == 1


def test_readyz_unready_while_draining(scripted: ScriptedFactory, proxy_factory: ProxyFactory
                                       ) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, downstream=FAST_PROBE))
    wait_ready(proxy, 200)
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo()
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        proxy.send_signal(signal.SIGTERM)  # the open transaction keeps the drain going
        body = wait_ready(proxy, 503)
        assert body == b"not ready: not accepting connections\n"
        assert get(proxy, "/healthz")[0] == 200
        client.cmd("QUIT")
    assert proxy.wait_exit() == 0


def test_probe_off_readiness_ignores_the_downstream(
        scripted: ScriptedFactory, proxy_factory: ProxyFactory) -> None:
    downstream = scripted()
    proxy = proxy_factory(base_config(downstream.port, downstream={"probe_interval": 0}))
    downstream.stop()
    assert wait_ready(proxy, 200) == b"ready\n"
    assert "relayproxy_downstream_up{" not in proxy.metrics_text()


def test_reload_gauges(scripted: ScriptedFactory, proxy_factory: ProxyFactory) -> None:
    """relayproxy_config_last_reload_successful and relayproxy_max_connections (the alerting
    rules' inputs) follow SIGHUP reloads."""
    downstream = scripted()
    config = base_config(downstream.port, server={"max_connections": 40})
    proxy = proxy_factory(config)
    assert proxy.metric("relayproxy_max_connections") == 40
    assert proxy.metric("relayproxy_config_last_reload_successful") == 1

    config["server"]["max_connections"] = -1
    proxy.reload(config)
    proxy.wait_for_log("reload failed")
    assert proxy.metric("relayproxy_config_last_reload_successful") == 0
    assert proxy.metric("relayproxy_max_connections") == 40

    config["server"]["max_connections"] = 60
    proxy.reload(config)
    proxy.wait_for_log("configuration reloaded")
    assert proxy.metric("relayproxy_config_last_reload_successful") == 1
    assert proxy.metric("relayproxy_max_connections") == 60


def test_healthz_fails_while_the_event_loop_is_wedged(
        scripted: ScriptedFactory, proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    """The endpoint is served by the loop that runs the sessions: a check that blocks it
    (WedgesLoop, at HELO) makes /healthz go unanswered until the loop runs again."""
    downstream = scripted()
    gate = tmp_path / "gate"
    config = base_config(downstream.port,
                         plugins={"checks": ["tests.support.checks:WedgesLoop"]})
    proxy = proxy_factory(config, env={"PYTHONPATH": str(PROJECT_ROOT),
                                       "RELAYPROXY_TEST_GATE": str(gate)})
    assert get(proxy, "/healthz")[0] == 200
    with RawSMTP() as client:
        client.connect(proxy.host, proxy.port)
        client.send("EHLO client.test\r\n")  # its answer waits for the loop

        def unanswered() -> bool:
            try:
                urllib.request.urlopen(_url(proxy, "/healthz"), timeout=0.5).close()
            except TimeoutError:
                return True
            return False

        wait_until(unanswered, "/healthz to go unanswered", 10, describe=proxy.log_tail)
        gate.touch()
        assert client.read_reply().code == 250
    assert get(proxy, "/healthz")[0] == 200
