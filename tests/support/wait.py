"""The one bounded-poll primitive of the test suite.

Why polling: the states the tests wait for live in another process — the Postfix queue and
Maildirs, the proxy's log file and metrics endpoint, a dnsmasq or demo process coming up,
a config reload the proxy handles asynchronously after SIGHUP. None of them offers an event
or a handle this process could block on, so the only observer is to look again. (In-process
waits, e.g. the scripted downstream server, use a condition variable instead.)

Every wait here is bounded: it ends by returning the awaited value, or by raising with a
message that names what was awaited, the timeout, and the caller's diagnostics (last error,
log tail, queue listing), so a test never hangs and never fails silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The default failure of :func:`wait_until`: the condition did not come true in time
    (or ``abort`` gave up). An AssertionError, so pytest reports it as a test failure."""


def wait_until(
    predicate: Callable[[], T | None],
    what: str,
    timeout: float,
    *,
    interval: float = 0.02,
    describe: Callable[[], str] | None = None,
    abort: Callable[[], str | None] | None = None,
    error: type[Exception] = WaitTimeout,
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    ``predicate`` is called at once, then every ``interval`` seconds until ``timeout``
    seconds have passed (it is always called at least once, and once more at the deadline).
    After each falsy result ``abort()`` (if given) is asked whether waiting is pointless,
    e.g. because the process that should produce the state has exited; a non-empty reason
    fails the wait at once. On timeout or abort, ``error`` (default :class:`WaitTimeout`,
    an AssertionError) is raised naming ``what`` and ``timeout``, followed by the text of
    ``describe()`` (evaluated only then).
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        result = predicate()
        if result:
            return result
        reason = abort() if abort is not None else None
        now = time.monotonic()
        if reason:
            headline = (f"gave up after {now - start:.1f}s (timeout {timeout}s) waiting for "
                        f"{what}: {reason}")
            raise error(_with_details(headline, describe))
        if now >= deadline:
            raise error(_with_details(f"timed out after {timeout}s waiting for {what}", describe))
        time.sleep(min(interval, deadline - now))


def _with_details(headline: str, describe: Callable[[], str] | None) -> str:
    if describe is None:
        return headline
    try:
        details = describe()
    except Exception as exc:  # the diagnostics must not hide the failure itself
        details = f"(describe() failed: {exc!r})"
    return f"{headline}\n{details}"


__all__ = ["WaitTimeout", "wait_until"]
