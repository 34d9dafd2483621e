"""A body observer that does nothing: what watching the body costs, for tests/bench/bench.py.

Not a test (no `test_` prefix). bench.py's `{config_observer}` placeholder names a config with

    [plugins]
    checks = ["tests.bench.noop_observer:NoopObserver"]

The proxy runs with the project root as its working directory, so `tests.bench.noop_observer`
imports as a namespace package (tests/ and tests/bench/ have no __init__.py).
"""

from __future__ import annotations

from relayproxy.checks import BodyObserver, Check, Envelope, Need, SessionInfo


class _NoopBodyObserver(BodyObserver):
    """Takes every chunk and keeps nothing; end() and abort() are the base class no-ops."""

    async def feed(self, chunk: bytes) -> None:
        return None


class NoopObserver(Check):
    """Declares Need.BODY, so the message pipeline unstuffs the body and feeds it here."""

    name = "bench_noop_observer"
    needs = frozenset({Need.BODY})

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        return _NoopBodyObserver()
