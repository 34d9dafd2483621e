"""A private redis-server on a loopback port (no persistence), stopped by its PID."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

from .daemon import ManagedProcess
from .ports import LOOPBACK, free_port
from .wait import wait_until

REDIS_SERVER = "/usr/bin/redis-server"
_POLL_INTERVAL = 0.05


class RedisServerError(RuntimeError):
    pass


class RedisServer(ManagedProcess):
    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="relayproxy-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        self.host = LOOPBACK
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10, same_port: bool = False) -> RedisServer:
        """Start on a free port (or, same_port, on the one it had: a Redis coming back)."""
        if not (same_port and self.port):
            self.port = free_port()
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
                "--protected-mode", "no"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                return False
            return self.command("PING") == "+PONG"

        wait_until(answers, f"redis-server on {self.host}:{self.port} to answer PING", timeout,
                   interval=_POLL_INTERVAL, describe=self.log_text,
                   abort=lambda: None if process.poll() is None else "redis-server exited",
                   error=RedisServerError)
        return self

    def command(self, *args: str) -> str | None:
        """One command in RESP, the first line of its reply (None if Redis did not answer)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                sock.settimeout(2)
                sock.sendall(payload.encode())
                return sock.makefile("rb").readline().decode().rstrip("\r\n")
        except OSError:
            return None

    def flush(self) -> None:
        if self.command("FLUSHALL") != "+OK":
            raise RedisServerError(f"FLUSHALL failed on {self.url}")

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
