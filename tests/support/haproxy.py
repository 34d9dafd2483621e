"""A private HAProxy in TCP mode on loopback, in front of relayproxy instances, sending the
PROXY protocol v2 header to each (`send-proxy-v2`); runs in the foreground, stopped by PID."""

from __future__ import annotations

import csv
import random
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Collection, Sequence
from pathlib import Path

from .daemon import ManagedProcess
from .ports import LOOPBACK, free_port
from .wait import wait_until

HAPROXY = "/usr/sbin/haproxy"
_POLL_INTERVAL = 0.05


class HAProxyError(RuntimeError):
    pass


def reserved_port(host: str = LOOPBACK, exclude: Collection[int] = ()) -> int:
    """A free port below the kernel's ephemeral range, for a backend that HAProxy's config
    names for the whole session while the proxies on it come and go: free_port() (bind to 0)
    hands out ephemeral ports only, so no other test's process is given this one meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 8000), low))
    random.shuffle(candidates)
    for port in [p for p in candidates if p not in exclude][:500]:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise HAProxyError(f"no free port below {low} on {host}")


class HAProxy(ManagedProcess):
    """Round robin over `backends` (host, port), one thread so the order is exact."""

    def __init__(self, backends: Sequence[tuple[str, int]], workdir: Path | None = None,
                 check: bool = False) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="relayproxy-haproxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.backends = list(backends)
        self.check = check  # health checks every 100 ms (with the PROXY header: LOCAL)
        self.host = LOOPBACK
        self.port = 0
        self.stats_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        check = " check inter 100ms" if self.check else ""
        servers = "".join(f"    server relay{i} {host}:{port} send-proxy-v2{check}\n"
                          for i, (host, port) in enumerate(self.backends))
        self.config_path.write_text(
            "global\n"
            "    nbthread 1\n"
            "    maxconn 256\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "frontend smtp\n"
            f"    bind {self.host}:{self.port}\n"
            "    default_backend relays\n"
            "backend relays\n"
            "    balance roundrobin\n"
            f"{servers}"
            "frontend stats\n"
            "    mode http\n"
            "    timeout client 10s\n"
            f"    bind {self.host}:{self.stats_port}\n"
            "    stats enable\n"
            "    stats uri /stats\n")

    def start(self, timeout: float = 15) -> HAProxy:
        self.port = free_port()
        self.stats_port = free_port()
        self._write_config()
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)],
                               capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise HAProxyError(f"haproxy -c refused the config:\n{check.stdout}{check.stderr}")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        process = self.process

        def listening() -> bool:
            if process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(listening, f"haproxy to listen on {self.host}:{self.port}", timeout,
                   interval=_POLL_INTERVAL, describe=self.log_text,
                   abort=lambda: None if process.poll() is None else "haproxy exited",
                   error=HAProxyError)
        return self

    def server_status(self) -> dict[str, str]:
        """Each backend server's status as HAProxy sees it (UP, DOWN, ...)."""
        url = f"http://{self.host}:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=5) as response:
            rows = list(csv.reader(response.read().decode().lstrip("# ").splitlines()))
        header = rows[0]
        name, status = header.index("svname"), header.index("status")
        return {row[name]: row[status] for row in rows[1:]
                if row and row[0] == "relays" and row[name].startswith("relay")}

