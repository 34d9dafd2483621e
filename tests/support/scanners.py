"""Private content scanners for the tests: clamd, spamd and rspamd from the Debian packages,
each on a loopback port of its own with its own configuration folder (no freshclam, no
sa-update, no network: test-infrastructure-notes.md).

clamd gets one signature the tests write (TEST_VIRUS below); spamd and rspamd keep their stock
rules, which recognise GTUBE offline. Started with start() (it returns at once, so the three
can come up in parallel: rspamd takes ~20 s on 2 cores), then wait_ready(); stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from .ports import LOOPBACK, free_port
from .wait import wait_until

CLAMD = "/usr/sbin/clamd"
SPAMD = "/usr/sbin/spamd"
RSPAMD = "/usr/bin/rspamd"

# Any message containing these bytes is "infected" for the test clamd.
TEST_VIRUS = b"RELAYPROXY-TEST-VIRUS-5b1e0c7a-do-not-deliver"
TEST_VIRUS_NAME = "Relayproxy.Test.Virus"  # clamd reports it with ".UNOFFICIAL"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)  # the daemons drop to nobody: every folder must be traversable
    return path


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Daemon:
    name = "daemon"

    def __init__(self) -> None:
        self.dir = _make_dir(Path(tempfile.mkdtemp(prefix=f"relayproxy-{self.name}-",
                                                   dir="/tmp")))
        self.host = LOOPBACK
        self.port = free_port()
        self.log_path = self.dir / "output.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.dir, start_new_session=True)
        return self

    def ready(self) -> bool:
        return _port_open(self.host, self.port)

    def wait_ready(self, timeout: float = 120) -> Daemon:
        def exited() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                return f"{self.name} exited with {self.process.returncode}"
            return None

        wait_until(self.ready, f"{self.name} on {self.host}:{self.port}", timeout,
                   interval=0.2, abort=exited, describe=lambda: self.log_tail())
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        # the daemon's own process group (start_new_session): its workers go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


class Clamd(Daemon):
    name = "clamd"

    # room for the 100 MB streaming test; clamd skips files over MaxFileSize unscanned
    def __init__(self, stream_max: int = 200 * 1024 * 1024) -> None:
        super().__init__()
        db = _make_dir(self.dir / "db")
        (db / "relayproxy-test.ndb").write_text(f"{TEST_VIRUS_NAME}:0:*:{TEST_VIRUS.hex()}\n")
        self.config = self.dir / "clamd.conf"
        self.config.write_text(
            f"DatabaseDirectory {db}\n"
            f"TCPSocket {self.port}\n"
            f"TCPAddr {self.host}\n"
            "Foreground yes\n"
            f"StreamMaxLength {stream_max}\n"
            f"MaxFileSize {stream_max}\nMaxScanSize {stream_max}\n"
            f"LogFile {self.dir / 'clamd.log'}\n"
            f"PidFile {self.dir / 'clamd.pid'}\n"
            "MaxThreads 4\n"
        )

    def command(self) -> list[str]:
        return [CLAMD, "-c", str(self.config)]


class Spamd(Daemon):
    name = "spamd"

    def command(self) -> list[str]:
        return [SPAMD, f"--listen={self.host}:{self.port}", "--allowed-ips=127.0.0.1",
                "-u", "nobody", "--syslog=stderr", f"--pidfile={self.dir / 'spamd.pid'}",
                "--max-children=2", "--min-children=1", "--local"]


class Rspamd(Daemon):
    name = "rspamd"

    def __init__(self, actions: str = "") -> None:
        """actions: the body of local.d/actions.conf (the benchmark moves every threshold out
        of reach, so that rspamd scans each message in full and refuses none)."""
        super().__init__()
        self.controller_port = free_port()
        local = _make_dir(self.dir / "local.d")
        for sub in ("db", "run", "log"):
            _make_dir(self.dir / sub)
            os.chown(self.dir / sub, 65534, 65534)
        (local / "worker-normal.inc").write_text(
            f'bind_socket = "{self.host}:{self.port}";\ncount = 1;\n')
        (local / "worker-controller.inc").write_text(
            f'bind_socket = "{self.host}:{self.controller_port}";\ncount = 1;\n')
        (local / "worker-proxy.inc").write_text("enabled = false;\n")
        (local / "worker-fuzzy.inc").write_text("enabled = false;\n")
        # the tests connect from 127.0.0.1: the headers must not be skipped as local mail
        (local / "milter_headers.conf").write_text(
            'use = ["x-spamd-result", "x-rspamd-server"];\n'
            "skip_local = false;\nskip_authenticated = false;\n")
        (local / "options.inc").write_text("dns { nameserver = [\"127.0.0.1:1\"]; }\n")
        (local / "redis.conf").write_text("")
        if actions:
            (local / "actions.conf").write_text(actions)

    def command(self) -> list[str]:
        return [RSPAMD, "-f", "-u", "nobody", "-g", "nogroup", "-c", "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={self.dir}", f"--var=DBDIR={self.dir / 'db'}",
                f"--var=RUNDIR={self.dir / 'run'}", f"--var=LOGDIR={self.dir / 'log'}"]

    def ready(self) -> bool:
        # the normal worker binds only once the configuration has loaded
        if not _port_open(self.host, self.port):
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
                return b"pong" in sock.recv(4096)
        except OSError:
            return False
