"""A process's resident memory, read from /proc: now, and its peak over a stretch of a test.

The bounded-memory tests compare the proxy's RSS before a load with the highest RSS that a
sampler thread sees while the load runs.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path


def vmrss_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB (the VmRSS line of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class RssPeak:
    """``with RssPeak(pid) as rss: ...``: ``rss.baseline`` is the RSS (KiB) on entry,
    ``rss.peak`` the highest RSS sampled every ``interval`` seconds until the block ends.

    A sample that cannot be read (the process has exited, or is a zombie without VmRSS) is
    skipped; the block's own assertions are the ones that should report such a failure.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-peak", daemon=True)

    @property
    def growth_mib(self) -> float:
        """How far the peak rose above the baseline, in MiB."""
        return (self.peak - self.baseline) / 1024

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, vmrss_kib(self.pid))

    def __enter__(self) -> RssPeak:
        self.baseline = self.peak = vmrss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join(5)


__all__ = ["RssPeak", "vmrss_kib"]
