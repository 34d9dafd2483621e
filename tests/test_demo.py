"""Issue point 10: `relayproxy demo`, the embedded default that needs no config: the proxy in
front of a built-in demo mailbox on loopback, metrics, and printed swaks commands to try.

One demo process (free ports) serves the module; it is stopped by PID with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.ports import LOOPBACK, free_port
from support.proxy import PROJECT_ROOT
from support.smtpclient import RawSMTP, send_message
from support.wait import wait_until

from relayproxy.cli import build_parser


class Demo:
    """A running `python -m relayproxy demo --port P --metrics-port M`."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.stdout_path = workdir / "demo.stdout"
        self.stderr_path = workdir / "demo.stderr"
        argv = [sys.executable, "-m", "relayproxy", "demo", "--port", str(self.port),
                "--metrics-port", str(self.metrics_port)]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                argv, cwd=PROJECT_ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def describe(self) -> str:
        return (f"demo pid {self.process.pid} returncode {self.process.poll()}\n"
                f"--- stdout ---\n{self.stdout()}\n"
                f"--- stderr (tail) ---\n{self.stderr_path.read_text(errors='replace')[-3000:]}")

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
        """Bounded wait; fails at once if the demo exits."""
        wait_until(predicate, what, timeout, interval=0.05, describe=self.describe,
                   abort=self._exit_reason)

    def _exit_reason(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"demo exited with code {code}"

    def greets(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
                sock.settimeout(2)
                ok = sock.makefile("rb").readline().startswith(b"220 ")
                sock.sendall(b"QUIT\r\n")
                return ok
        except OSError:
            return False

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM by PID; SIGKILL only if it does not exit in time (then the test fails)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
                raise AssertionError(f"demo ignored SIGTERM for {timeout}s\n"
                                     f"{self.describe()}") from None
        return self.process.returncode


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(tmp_path_factory.mktemp("demo"))
    try:
        running.wait_until(running.greets, f"220 on {LOOPBACK}:{running.port}")
        running.wait_until(lambda: "swaks" in running.stdout(), "swaks instructions on stdout")
        yield running
    finally:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
            try:
                running.process.wait(15)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait(15)


def _message(subject: str, rcpt: str) -> bytes:
    return (f"From: you@example.net\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.net>\r\n\r\nHello from the demo test.\r\n"
            ).encode()


def _delivered_lines(demo: Demo) -> list[str]:
    return [line for line in demo.stdout().splitlines() if "delivered" in line.lower()]


def test_demo_prints_swaks_instructions_for_its_port(demo: Demo) -> None:
    text = demo.stdout()
    assert "swaks" in text
    # The commands to try point at the port actually used, with the demo's users.
    assert f"{LOOPBACK}:{demo.port}" in text, text
    assert "alice@example.test" in text, text
    assert str(demo.metrics_port) in text, text


def test_demo_known_user_gets_250_and_is_delivered(demo: Demo) -> None:
    subject = f"demo-{uuid.uuid4().hex[:12]}"
    replies = send_message(LOOPBACK, demo.port, "you@example.net", ["alice@example.test"],
                           _message(subject, "alice@example.test"))
    assert replies["greeting"].code == 220
    assert [r.code for r in replies["rcpt"]] == [250]
    assert replies["dot"].code == 250, replies["dot"]
    demo.wait_until(lambda: any(subject in line for line in _delivered_lines(demo)),
                    f"a delivered line for {subject}")
    (line,) = [line for line in _delivered_lines(demo) if subject in line]
    assert "alice@example.test" in line


def test_demo_unknown_user_550_5_1_1_at_rcpt(demo: Demo) -> None:
    with RawSMTP(timeout=10) as client:
        client.connect(LOOPBACK, demo.port)
        assert client.ehlo("client.test").code == 250
        assert client.cmd("MAIL FROM:<you@example.net>").code == 250
        reply = client.cmd("RCPT TO:<nobody@example.test>")
        assert (reply.code, reply.enhanced) == (550, "5.1.1"), reply
        # A rejected recipient does not end the transaction.
        assert client.cmd("RCPT TO:<bob@example.test>").code == 250
        assert client.cmd("QUIT").code == 221


def test_demo_foreign_domain_550_5_7_1(demo: Demo) -> None:
    with RawSMTP(timeout=10) as client:
        client.connect(LOOPBACK, demo.port)
        assert client.ehlo("client.test").code == 250
        assert client.cmd("MAIL FROM:<you@example.net>").code == 250
        reply = client.cmd("RCPT TO:<someone@elsewhere.example>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        assert client.cmd("QUIT").code == 221


def test_demo_bare_lf_refused_and_not_delivered(demo: Demo) -> None:
    # The smuggling example the demo prints: refused, and the mailbox gets nothing.
    smuggled = f"smuggled-{uuid.uuid4().hex[:12]}"
    body = (f"Subject: {smuggled}\r\n\r\na\n.\nMAIL FROM:<x@y>\r\n").encode()
    replies = send_message(LOOPBACK, demo.port, "you@example.net", ["bob@example.test"], body)
    assert (replies["dot"].code, replies["dot"].enhanced) == (550, "5.6.0"), replies["dot"]
    # A later message's delivery line proves the mailbox has processed everything before it.
    later = f"later-{uuid.uuid4().hex[:12]}"
    replies = send_message(LOOPBACK, demo.port, "you@example.net", ["carol@example.test"],
                           _message(later, "carol@example.test"))
    assert replies["dot"].code == 250
    demo.wait_until(lambda: any(later in line for line in _delivered_lines(demo)),
                    f"a delivered line for {later}")
    assert not any(smuggled in line for line in demo.stdout().splitlines())


def test_demo_metrics_url_answers(demo: Demo) -> None:
    with urllib.request.urlopen(demo.metrics_url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    assert "relayproxy_connections_total" in text
    assert "relayproxy_messages_total" in text


def test_demo_defaults_are_2525_and_9325() -> None:
    # The documented defaults, without binding them (they may be in use on this machine).
    args = build_parser().parse_args(["demo"])
    assert (args.port, args.metrics_port) == (2525, 9325)


def test_demo_sigterm_exits_0(demo: Demo) -> None:
    # Last in the module: the shared demo is stopped here, by its PID.
    assert demo.stop() == 0, demo.describe()
    assert not demo.greets()
