"""`[[limit]]` rate limits, the recipient cache, greylisting and MemoryStore, at unit level:
the checks' hooks called directly on a MemoryStore driven by a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from relayproxy.checks.base import Envelope, SessionInfo
from relayproxy.policy.limits import Limit, Limits
from relayproxy.policy.recipients import Greylist, RecipientCache
from relayproxy.policy.state import MemoryStore, client_net
from relayproxy.policy.verdict import Action, Verdict
from relayproxy.replies import Reply, for_verdict

T = TypeVar("T")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def session(ip: str = "192.0.2.10") -> SessionInfo:
    return SessionInfo("s1", ip, 25000, helo="client.example")


def limit(**table: Any) -> Limit:
    return Limit.from_table({"name": "l", "count": "messages", "per": "client_net", "max": 2,
                             "window": 100, **table})


class Setup:
    """A Limits check on a fresh store, recording on_hit calls."""

    def __init__(self, *limits: Limit, cache: bool = False) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)
        self.hits: list[tuple[str, bool]] = []
        self.cache = RecipientCache(self.store) if cache else None
        self.check = Limits(limits, self.store, recipient_cache=self.cache,
                            on_hit=lambda lim, enforced: self.hits.append((lim.name, enforced)))

    def connect(self, ip: str = "192.0.2.10") -> Verdict | None:
        return run(self.check.on_connect(session(ip)))

    def mail(self, sender: str = "a@example.com", ip: str = "192.0.2.10") -> Verdict | None:
        return run(self.check.on_mail(session(ip), Envelope(sender)))

    def rcpt(self, rcpt: str = "r@example.org", sender: str = "a@example.com",
             ip: str = "192.0.2.10") -> Verdict | None:
        return run(self.check.on_rcpt(session(ip), Envelope(sender), rcpt))

    def rcpt_reply(self, reply: Reply, rcpt: str = "r@example.org",
                   ip: str = "192.0.2.10") -> Verdict | None:
        return run(self.check.on_rcpt_reply(session(ip), Envelope("a@example.com"), rcpt, reply))


UNKNOWN = Reply.from_downstream(550, "5.1.1 <r@example.org>: User unknown")
ACCEPTED = Reply.from_downstream(250, "2.1.5 Ok")


def reply_of(verdict: Verdict | None) -> str:
    assert verdict is not None
    return str(for_verdict(verdict))


# ---------------------------------------------------------------------- each count kind


def test_connections_over_max_close_with_421() -> None:
    s = Setup(limit(count="connections", max=2))
    assert s.connect() is None
    assert s.connect() is None
    verdict = s.connect()
    assert verdict is not None and verdict.action is Action.DISCONNECT
    assert reply_of(verdict) == "421 4.7.0 Too many connections from your network, try again later"
    assert verdict.source == "rule"
    assert s.hits == [("l", True)]


def test_connections_reject_answers_554() -> None:
    s = Setup(limit(count="connections", max=1, action="reject"))
    s.connect()
    assert reply_of(s.connect()) == "554 5.7.1 Too many connections from your network"


def test_messages_over_max_tempfail_then_reject() -> None:
    s = Setup(limit(max=2), limit(name="hard", max=3, action="reject"))
    assert s.mail() is None and s.mail() is None
    assert reply_of(s.mail()) == "451 4.7.1 Too many messages, slow down"
    # both limits count every attempt; the first refusal in order wins
    assert reply_of(s.mail()) == "451 4.7.1 Too many messages, slow down"
    assert s.hits == [("l", True), ("l", True), ("hard", True)]
    only_hard = Setup(limit(name="hard", max=1, action="reject"))
    only_hard.mail()
    assert reply_of(only_hard.mail()) == "550 5.7.1 Too many messages"


def test_recipients_over_max() -> None:
    s = Setup(limit(count="recipients", per="sender", max=3))
    assert [s.rcpt(f"r{i}@example.org") for i in range(3)] == [None] * 3
    verdict = s.rcpt("r4@example.org")
    assert reply_of(verdict) == "451 4.7.1 Too many recipients, slow down"
    assert s.rcpt(sender="other@example.com") is None


def test_unknown_recipients_over_max_close_with_421() -> None:
    s = Setup(limit(count="unknown_recipients", max=2))
    assert s.rcpt_reply(ACCEPTED) is None
    assert s.rcpt_reply(Reply.from_downstream(450, "4.2.0 Try later")) is None  # 4xx: not unknown
    assert s.rcpt_reply(Reply(550, "5.7.1", "local refusal")) is None  # not the downstream's
    assert s.rcpt_reply(UNKNOWN) is None
    assert s.rcpt_reply(UNKNOWN) is None
    verdict = s.rcpt_reply(UNKNOWN)
    assert verdict is not None and verdict.action is Action.DISCONNECT
    assert reply_of(verdict) == "421 4.7.0 Too many unknown recipients, closing connection"


def test_custom_reply() -> None:
    s = Setup(limit(max=1, reply="452 4.7.1 Slow down please"))
    s.mail()
    verdict = s.mail()
    assert verdict is not None and verdict.action is Action.TEMPFAIL
    assert reply_of(verdict) == "452 4.7.1 Slow down please"


# ---------------------------------------------------------------------- window and keys


def test_sliding_window_lets_events_expire() -> None:
    s = Setup(limit(max=2, window=100))
    s.mail()
    s.clock.now += 50
    s.mail()
    s.clock.now += 49  # 99 s after the first: both still count
    assert s.mail() is not None
    s.clock.now += 1  # the first has left the window; the second and the refused one remain
    assert s.mail() is not None
    s.clock.now += 50  # only the last two remain
    assert s.mail() is not None
    s.clock.now += 100  # all gone
    assert s.mail() is None


def test_keys_per_client_network() -> None:
    s = Setup(limit(max=1))
    assert s.mail(ip="192.0.2.10") is None
    assert s.mail(ip="198.51.100.10") is None  # another network, its own count
    assert s.mail(ip="192.0.2.11") is None  # IPv4: /32 by default
    assert s.mail(ip="192.0.2.10") is not None
    # IPv6: one /64 is one client
    assert s.mail(ip="2001:db8:1:2::1") is None
    assert s.mail(ip="2001:db8:1:2:ffff::9") is not None
    assert s.mail(ip="2001:db8:1:3::1") is None
    wide = Setup(limit(max=1, ipv4_prefix=24))
    assert wide.mail(ip="192.0.2.10") is None
    assert wide.mail(ip="192.0.2.200") is not None


def test_client_net() -> None:
    assert client_net("192.0.2.77") == "192.0.2.77/32"
    assert client_net("192.0.2.77", 24) == "192.0.2.0/24"
    assert client_net("::ffff:192.0.2.77", 24) == "192.0.2.0/24"
    assert client_net("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_net("fe80::1%eth0", 32, 10) == "fe80::/10"
    assert client_net("not-an-address") == "not-an-address"


def test_keys_per_sender_and_domain_fold_case_and_count_null_sender() -> None:
    s = Setup(limit(per="sender", max=1), limit(name="dom", per="sender_domain", max=2))
    assert s.mail("Alice@Example.COM") is None
    assert s.mail("alice@example.com") is not None  # same sender, whatever its case
    assert s.hits == [("l", True)]
    assert s.mail("bob@EXAMPLE.com") is not None  # the domain's third message
    assert s.hits[-1] == ("dom", True)
    assert s.mail("") is None  # the null sender: "<>", a key of its own
    assert s.mail("") is not None
    assert run(s.store.count("limit:l:<>", 100)) == 2
    assert run(s.store.count("limit:dom:<>", 100)) == 2


# ---------------------------------------------------------------------- monitor and blocks


def test_monitor_counts_and_reports_without_refusing() -> None:
    s = Setup(limit(max=1, monitor=True, block_for=600))
    assert [s.mail() for _ in range(3)] == [None] * 3
    assert s.hits == [("l", False), ("l", False)]
    assert run(s.store.count("limit:l:192.0.2.10/32", 100)) == 3
    assert s.connect() is None  # and it never blocks


def test_block_for_refuses_the_network_until_it_ends() -> None:
    s = Setup(limit(count="unknown_recipients", max=1, block_for=600))
    s.rcpt_reply(UNKNOWN)
    assert s.rcpt_reply(UNKNOWN) is not None
    s.clock.now += 300
    verdict = s.connect()
    assert verdict is not None and verdict.action is Action.DISCONNECT
    assert reply_of(verdict) == ("421 4.7.0 Too many unknown recipients from your network, "
                                 "try again later")
    # sessions already open are refused at their next MAIL and RCPT
    assert s.mail() is not None and s.rcpt() is not None
    assert s.connect(ip="198.51.100.1") is None
    s.clock.now += 299
    assert s.connect() is not None
    s.clock.now += 1
    assert s.connect() is None and s.mail() is None


def test_block_per_sender_tempfails_mail() -> None:
    s = Setup(limit(count="recipients", per="sender", max=1, block_for=60, window=10))
    s.rcpt()
    assert s.rcpt() is not None
    s.clock.now += 30  # the window has passed, the block has not
    verdict = s.mail()
    assert verdict is not None and verdict.action is Action.TEMPFAIL
    assert reply_of(verdict) == "451 4.7.1 Too many recipients from this sender, try again later"
    assert s.mail("other@example.com") is None
    assert s.connect() is None  # a sender's block is no reason to refuse the client
    s.clock.now += 30
    assert s.mail() is None


def test_cached_unknown_recipients_count_too() -> None:
    s = Setup(limit(count="unknown_recipients", max=2), cache=True)
    assert s.rcpt_reply(UNKNOWN) is None  # recorded in the cache, counted once
    cached = s.rcpt()  # answered from the cache, counted again
    assert cached is not None and cached.action is Action.REJECT
    assert reply_of(cached) == "550 5.1.1 <r@example.org>: User unknown"
    assert cached.source == "downstream"
    assert reply_of(s.rcpt()) == "421 4.7.0 Too many unknown recipients, closing connection"


# ---------------------------------------------------------------------- MemoryStore


def test_memory_store_basics() -> None:
    clock = Clock()
    store = MemoryStore(clock, buckets=10)
    assert run(store.hit("k", 10)) == 1
    assert run(store.hit("k", 10, amount=4)) == 5
    assert run(store.count("k", 10)) == 5
    assert run(store.count("other", 10)) == 0
    run(store.block("k", 5))  # its own namespace
    assert run(store.blocked("k")) == 5 and run(store.count("k", 10)) == 5
    run(store.block("k", 1))  # a shorter block keeps the longer one
    clock.now += 4
    assert run(store.blocked("k")) == 1
    clock.now += 1
    assert run(store.blocked("k")) == 0
    run(store.put("k", "v", 3))
    assert run(store.get("k")) == "v"
    clock.now += 3
    assert run(store.get("k")) is None
    clock.now += 10
    assert run(store.count("k", 10)) == 0
    assert len(store) == 0  # whatever expired and was looked at is gone


def test_memory_store_window_resolution_is_one_bucket() -> None:
    clock = Clock(0.0)
    store = MemoryStore(clock, buckets=10)  # 1 s buckets for a 10 s window
    run(store.hit("k", 10))
    clock.now = 0.9
    run(store.hit("k", 10))
    clock.now = 9.99
    assert run(store.count("k", 10)) == 2
    clock.now = 10.0  # both were in the bucket [0, 1): they leave together
    assert run(store.count("k", 10)) == 0


def test_memory_store_memory_per_key_is_bounded() -> None:
    store = MemoryStore(Clock(), buckets=8)

    async def flood() -> None:
        for _ in range(10_000):
            await store.hit("k", 60)

    run(flood())
    assert run(store.count("k", 60)) == 10_000
    (entry,) = store._entries.values()
    assert len(entry.counts) == 8  # a counter per sub-window, however many events


def test_memory_store_bounds_keys_evicting_expired_then_least_recent() -> None:
    clock = Clock()
    store = MemoryStore(clock, max_keys=3)
    run(store.put("old", "1", 1000))
    run(store.hit("brief", 10))
    run(store.put("recent", "2", 1000))
    clock.now += 20  # "brief" has expired, though more recently used than "old"
    run(store.put("new", "3", 1000))
    assert len(store) == 3
    assert run(store.get("old")) == "1" and run(store.get("new")) == "3"
    run(store.get("recent"))
    run(store.get("old"))  # "new" is now the least recently used
    run(store.put("newer", "4", 1000))  # nothing expired: the least recently used goes
    assert len(store) == 3
    assert run(store.get("new")) is None
    assert [run(store.get(k)) for k in ("recent", "old", "newer")] == ["2", "1", "4"]
    for i in range(100):
        run(store.hit(f"flood{i}", 60))
        assert len(store) <= 3


# ---------------------------------------------------------------------- recipient cache


def test_recipient_cache_negative_and_positive_with_ttl() -> None:
    clock = Clock()
    cache = RecipientCache(MemoryStore(clock), positive_ttl=3600, negative_ttl=600)
    env = Envelope("a@example.com")
    assert run(cache.on_rcpt(session(), env, "Bad@Example.ORG")) is None
    assert run(cache.on_rcpt_reply(session(), env, "Bad@Example.ORG", UNKNOWN)) is None
    assert run(cache.on_rcpt_reply(session(), env, "good@example.org", ACCEPTED)) is None
    # the domain's case does not matter, the local part's does
    verdict = run(cache.on_rcpt(session(), env, "Bad@example.org"))
    assert reply_of(verdict) == "550 5.1.1 <r@example.org>: User unknown"
    assert verdict is not None and verdict.check == "recipient_cache"
    assert run(cache.on_rcpt(session(), env, "bad@example.org")) is None
    assert run(cache.on_rcpt(session(), env, "good@example.org")) is None  # asks downstream
    positive = run(cache.lookup("good@EXAMPLE.org"))
    assert positive is not None and positive.code == 250
    clock.now += 600
    assert run(cache.on_rcpt(session(), env, "Bad@example.org")) is None
    assert run(cache.lookup("good@example.org")) is not None
    clock.now += 3000
    assert run(cache.lookup("good@example.org")) is None


def test_recipient_cache_keeps_only_address_refusals() -> None:
    cache = RecipientCache(MemoryStore(Clock()))
    for reply in (Reply.from_downstream(450, "4.1.1 Try again"),  # temporary: never
                  Reply.from_downstream(550, "5.7.1 Relay access denied"),  # the client's
                  Reply.from_downstream(550, "No such user"),  # no status: 5.0.0
                  Reply(550, "5.1.1", "a local refusal")):  # not the downstream's
        run(cache.record("x@example.org", reply))
        assert run(cache.lookup("x@example.org")) is None, reply
    every = RecipientCache(MemoryStore(Clock()), negative_statuses=None)
    run(every.record("x@example.org", Reply.from_downstream(554, "5.7.1 Denied")))
    assert reply_of(run(every.refusal("x@example.org"))) == "554 5.7.1 Denied"


def test_recipient_cache_answer_is_replaced() -> None:
    cache = RecipientCache(MemoryStore(Clock()))
    run(cache.record("x@example.org", UNKNOWN))
    run(cache.record("x@example.org", ACCEPTED))  # the mailbox was created meanwhile
    assert run(cache.refusal("x@example.org")) is None


# ---------------------------------------------------------------------- greylisting


def test_greylist_triplet_passes_after_delay_within_retry_window() -> None:
    clock = Clock()
    grey = Greylist(MemoryStore(clock), clock=clock)
    env = Envelope("a@example.com")

    def attempt(rcpt: str = "r@example.org", ip: str = "192.0.2.10",
                reply: Reply = ACCEPTED) -> Verdict | None:
        return run(grey.on_rcpt_reply(session(ip), env, rcpt, reply))

    assert reply_of(attempt()) == "451 4.7.1 Greylisted, try again in 300 seconds"
    assert attempt(reply=UNKNOWN) is None  # a refused recipient is not greylisted
    clock.now += 100
    assert reply_of(attempt(ip="192.0.2.99")) == (  # same /24, same triplet
        "451 4.7.1 Greylisted, try again in 200 seconds")
    clock.now += 200
    assert attempt() is None
    assert reply_of(attempt("other@example.org")) == (
        "451 4.7.1 Greylisted, try again in 300 seconds")
    clock.now += 30 * 86400  # passed triplets last `expire` from their last use
    assert attempt() is None
    clock.now += 36 * 86400
    assert attempt() is not None
    # a retry after the retry window starts over
    clock.now += 4 * 3600 + 1
    assert reply_of(attempt()) == "451 4.7.1 Greylisted, try again in 300 seconds"


def test_greylist_validation() -> None:
    with pytest.raises(ValueError, match="retry_window"):
        Greylist(MemoryStore(), delay=600, retry_window=300)
    with pytest.raises(ValueError, match="ipv4_prefix"):
        Greylist(MemoryStore(), ipv4_prefix=33)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(("change", "key"), [
    ({"name": ""}, "name"),
    ({"name": "a:b"}, "name"),
    ({"count": "bytes"}, "count"),
    ({"per": "helo"}, "per"),
    ({"count": "connections", "per": "sender"}, "per"),
    ({"max": 0}, "max"),
    ({"max": "10"}, "max"),
    ({"max": True}, "max"),
    ({"window": 0}, "window"),
    ({"window": float("inf")}, "window"),
    ({"action": "drop"}, "action"),
    ({"count": "unknown_recipients", "action": "reject"}, "action"),
    ({"reply": "451 Slow down"}, "reply"),
    ({"reply": "451 5.7.1 Slow down"}, "reply"),
    ({"reply": "550 5.7.1 No"}, "reply"),  # a tempfail needs a 4xx
    ({"count": "connections", "reply": "451 4.7.1 Later"}, "reply"),  # must close: 421
    ({"block_for": -1}, "block_for"),
    ({"monitor": "yes"}, "monitor"),
    ({"ipv4_prefix": 33}, "ipv4_prefix"),
    ({"ipv6_prefix": -1}, "ipv6_prefix"),
    ({"per": "sender", "ipv6_prefix": 48}, "ipv6_prefix"),
    ({"blockfor": 10}, "blockfor"),
])
def test_from_table_errors_name_the_key(change: dict[str, Any], key: str) -> None:
    table = {"name": "mine", "count": "messages", "per": "client_net", "max": 10,
             "window": 60, **change}
    with pytest.raises(ValueError, match=f"^limit .*: {key}: "):
        Limit.from_table(table)


@pytest.mark.parametrize("key", ["name", "count", "per", "max", "window"])
def test_from_table_required_keys(key: str) -> None:
    table: dict[str, Any] = {"name": "mine", "count": "messages", "per": "client_net",
                             "max": 10, "window": 60}
    del table[key]
    label = "<unnamed>" if key == "name" else "mine"
    with pytest.raises(ValueError, match=f"^limit {label}: {key}: required$"):
        Limit.from_table(table)


def test_from_table_full() -> None:
    got = Limit.from_table({"name": "unknown-rcpt", "count": "unknown_recipients",
                            "per": "client_net", "max": 20, "window": 600.5,
                            "reply": "421 4.7.0 Go away", "block_for": 3600, "monitor": True,
                            "ipv4_prefix": 24, "ipv6_prefix": 48})
    assert got == Limit("unknown-rcpt", "unknown_recipients", "client_net", 20, 600.5,
                        "tempfail", "421 4.7.0 Go away", 3600, True, 24, 48)


def test_limits_refuse_two_limits_of_one_name() -> None:
    with pytest.raises(ValueError, match=r"^limit l: name: "):
        Limits([limit(), limit(count="recipients")], MemoryStore())
