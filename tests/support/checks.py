"""Checks the tests load into the proxy (`plugins.checks = ["tests.support.checks:Name"]`).

They exercise the message pipeline's seam from outside, as a rule, an authentication check or a
scanner will: the header section, the streamed body, the held window and end-of-data verdicts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import ClassVar

from relayproxy.checks import BodyObserver, Check, Envelope, MessageInfo, Need, SessionInfo
from relayproxy.headers import HeaderSection
from relayproxy.policy.verdict import Verdict


class StripForged(Check):
    """Removes Authentication-Results fields that claim the proxy's name (proxy.test), and
    prepends one field of its own."""

    name = "strip_forged"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.HEADERS})

    async def on_headers(
        self, session: SessionInfo, envelope: Envelope, headers: HeaderSection
    ) -> Verdict | None:
        removed = headers.remove(
            "Authentication-Results", lambda f: f.value.split(";")[0].strip() == "proxy.test")
        headers.prepend("X-Pipeline-Check", f"removed={removed}")
        return None


class _Digest(BodyObserver):
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    async def feed(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)

    def headers_leaving(self, headers: HeaderSection) -> None:
        # what is known when the section leaves early: how much of the body was seen
        headers.prepend("X-Body-Observed", f"{self.size} octets when the header section left")

    async def end(self, message: MessageInfo) -> Verdict | None:
        if message.headers_sent:
            return None  # too late to say it: never write a result for what was not held
        assert message.headers is not None
        message.headers.prepend("X-Body-Digest", f"sha256={self.hash.hexdigest()} size={self.size}")
        return None


class BodyDigest(Check):
    """Computes a digest over the whole body and prepends it at end of data (held window); a
    larger message's header section says how much of the body was seen when it left."""

    name = "body_digest"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.BODY, Need.END_HEADERS})

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        return _Digest()


class _Refuser(BodyObserver):
    MARK = b"REFUSE-AT-END"

    def __init__(self) -> None:
        self.tail = b""
        self.seen = False

    async def feed(self, chunk: bytes) -> None:
        window = self.tail + chunk
        self.seen = self.seen or self.MARK in window
        self.tail = window[-len(self.MARK) :]

    async def end(self, message: MessageInfo) -> Verdict | None:
        if self.seen:
            return Verdict.reject("Refused by the test observer", 550, "5.7.1", check="refuser")
        return None


class RefuseMarked(Check):
    """Refuses, at end of data, a message whose body contains REFUSE-AT-END anywhere."""

    name = "refuse_marked"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.BODY})

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        return _Refuser()


class _Gate(BodyObserver):
    def __init__(self, gate: Path) -> None:
        self.gate = gate

    async def feed(self, chunk: bytes) -> None:
        # a scanner that stopped reading: nothing goes on until the test opens the gate
        while not self.gate.exists():
            await asyncio.sleep(0.02)


class Stalled(Check):
    """Stalls on every body chunk until the file named by RELAYPROXY_TEST_GATE exists."""

    name = "stalled"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.BODY})

    def __init__(self) -> None:
        self.gate = Path(os.environ["RELAYPROXY_TEST_GATE"])

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        return _Gate(self.gate)


class Exploding(Check):
    """Raises in its body observer: the pipeline must tempfail, not crash the session."""

    name = "exploding"
    needs: ClassVar[frozenset[Need]] = frozenset({Need.BODY})

    class _Boom(BodyObserver):
        async def feed(self, chunk: bytes) -> None:
            raise RuntimeError("observer failure for the test")

    def body_observer(self, session: SessionInfo, envelope: Envelope) -> BodyObserver | None:
        return self._Boom()


class WedgesLoop(Check):
    """Blocks the whole event loop at HELO (a synchronous call where none may be) until the
    file named by RELAYPROXY_TEST_GATE exists, for at most 30 s: a wedged proxy for the
    liveness endpoint to notice."""

    name = "wedges-loop"

    def __init__(self) -> None:
        self.gate = Path(os.environ["RELAYPROXY_TEST_GATE"])

    async def on_helo(self, session: SessionInfo) -> Verdict | None:
        deadline = time.monotonic() + 30
        while not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # blocking on purpose
        return None
