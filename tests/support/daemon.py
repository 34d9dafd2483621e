"""What the tests' private daemons (dnsmasq, redis-server, HAProxy) share: one process the
tests started, its log file, and stopping it by its PID (never by name)."""

from __future__ import annotations

import subprocess
from pathlib import Path


class ManagedProcess:
    """Subclasses set log_path and start self.process themselves."""

    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, timeout: float = 10) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
