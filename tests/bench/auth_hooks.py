"""The authentication check's hooks in process, without the proxy around them: what one
w1s message (bench.py's DKIM-signed 4 KB message from bench.test, its SPF, DMARC and DKIM
records answered by bench.py's dnsmasq and cached) costs in AuthCheck alone.

    .venv/bin/python tests/bench/auth_hooks.py [--messages N] [--profile FILE]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python tests/bench/auth_hooks.py --messages N   # for N = 100 and 400

Runs MAIL (SPF), the header section, the body and the end of data for --messages messages
after a warm-up message (which fills the DNS cache) and prints the results of the last one.
Two callgrind counts with different --messages give the instructions per message (their
difference over the difference in messages); --profile writes a cProfile of the loop.
Not collected by pytest; needs dnsmasq.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import HELO, HOST, RCPT, SENDER, WORKLOADS, auth_dns, signed_message

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from relayproxy.auth.check import KEY, AuthCheck
from relayproxy.checks.base import Envelope, MessageInfo, SessionInfo
from relayproxy.config import AuthConfig, DNSConfig, HostPort
from relayproxy.dns import make_resolver
from relayproxy.headers import HeaderSection, find_end


async def one(check: AuthCheck, wire: bytes) -> Envelope:
    session = SessionInfo("bench", HOST, 40000, helo=HELO, esmtp=True)
    envelope = Envelope(sender=SENDER, recipients=[RCPT])
    assert await check.on_mail(session, envelope) is None
    found = find_end(wire)
    assert found is not None
    end, body_start = found
    headers = HeaderSection.parse(wire[:end], wire[end:body_start])
    assert await check.on_headers(session, envelope, headers) is None
    observer = check.body_observer(session, envelope)
    assert observer is not None
    await observer.feed(wire[body_start:-3])  # without the final dot
    verdict = await observer.end(MessageInfo(len(wire), headers=headers))
    assert verdict is None, verdict
    return envelope


async def run(port: int, wire: bytes, messages: int, profile: str) -> None:
    resolver = make_resolver(DNSConfig(nameservers=(HostPort(HOST, port),)))
    check = AuthCheck(AuthConfig(enabled=True), resolver, "relayproxy.bench.test")
    envelope = await one(check, wire)  # fills the cache: the rest is answered from it
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    for _ in range(messages):
        envelope = await one(check, wire)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    print(envelope.facts[KEY].field("relayproxy.bench.test").decode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--profile", default="", help="write a cProfile of the loop here")
    args = ap.parse_args()
    wire, record = signed_message(WORKLOADS["w1s"].size)
    with tempfile.TemporaryDirectory(prefix="relayproxy-auth-hooks-") as tmp, \
            auth_dns(Path(tmp), record) as port:
        asyncio.run(run(port, wire, args.messages, args.profile))


if __name__ == "__main__":
    main()
