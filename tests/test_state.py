"""RedisStore against a real redis-server: the Store semantics MemoryStore has, shared by two
stores (two proxies), atomic under concurrency, expiring keys; and what an unreachable or
silent Redis gives with each state.on_error, through the checks' pipeline."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support.proxy import ProxyProcess, base_config, run_cli, toml_dumps
from support.redisd import RedisServer
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP
from support.wait import wait_until

from relayproxy import metrics
from relayproxy.checks.base import Envelope, Pipeline, SessionInfo
from relayproxy.config import ConfigError, StateConfig, from_dict
from relayproxy.policy.limits import Limit, Limits
from relayproxy.policy.recipients import Greylist, RecipientCache
from relayproxy.policy.redis_store import RedisStore
from relayproxy.policy.state import MemoryStore, StateUnavailable
from relayproxy.policy.verdict import Action
from relayproxy.replies import Reply
from relayproxy.runtime import make_store

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    # a bound of its own: a store that hangs fails the test instead of stalling the suite
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)
    return asyncio.run(bounded())


def store(url: str, **kwargs: Any) -> RedisStore:
    return RedisStore(url, **{"key_prefix": "t:", "timeout": 2.0, **kwargs})


def once(url: str, operation: Callable[[RedisStore], Awaitable[T]], **kwargs: Any) -> T:
    """operation on a store of its own (a store's connections belong to one event loop)."""
    async def scenario() -> T:
        s = store(url, **kwargs)
        try:
            return await operation(s)
        finally:
            await s.close()
    return run(scenario())


def state_errors(kind: str) -> float:
    value = metrics.REGISTRY.get_sample_value("relayproxy_state_errors_total", {"kind": kind})
    assert value is not None
    return value


@pytest.fixture
def dead_url() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


# ---------------------------------------------------------------------- semantics


def test_counts_are_shared_by_two_stores(redis_server: RedisServer) -> None:
    async def scenario() -> list[int]:
        a, b = store(redis_server.url), store(redis_server.url)
        try:
            return [await a.hit("k", 60), await b.hit("k", 60), await a.hit("k", 60, 3),
                    await b.count("k", 60), await a.count("other", 60),
                    await a.hit("k", 30)]  # another window is another counter
        finally:
            await a.close()
            await b.close()

    assert run(scenario()) == [1, 2, 5, 5, 0, 1]
    keys = redis_server.command("KEYS", "*")
    assert keys == "*2", keys  # two windows of "k"; count() created nothing


def test_concurrent_hits_from_two_stores_lose_no_count(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[list[int], int]:
        a, b = store(redis_server.url), store(redis_server.url)
        try:
            results = await asyncio.gather(
                *(s.hit("burst", 600) for _ in range(100) for s in (a, b)))
            return list(results), await a.count("burst", 600)
        finally:
            await a.close()
            await b.close()

    results, total = run(scenario())
    assert total == 200
    # each hit saw its own total: no two read-modify-writes interleaved
    assert sorted(results) == list(range(1, 201))


def test_window_and_keys_expire(redis_server: RedisServer) -> None:
    assert once(redis_server.url, lambda s: s.hit("short", 0.5)) == 1
    pttl = int(redis_server.command("PTTL", "t:h:0.5:short").lstrip(":"))
    assert 0 < pttl <= 500, pttl
    wait_until(lambda: redis_server.command("EXISTS", "t:h:0.5:short") == ":0",
               "the window's key to expire in Redis", timeout=10)
    assert once(redis_server.url, lambda s: s.count("short", 0.5)) == 0


def test_blocks_keep_the_longer_one_and_expire(redis_server: RedisServer) -> None:
    async def scenario(s: RedisStore) -> tuple[float, float, float]:
        before = await s.blocked("net")
        await s.block("net", 100)
        await s.block("net", 1)  # shorter: the 100 s block stays
        long_left = await s.blocked("net")
        await s.block("brief", 0.3)
        return before, long_left, await s.blocked("brief")

    before, long_left, brief = once(redis_server.url, scenario)
    assert before == 0
    assert 99 < long_left <= 100
    assert 0 < brief <= 0.3
    wait_until(lambda: once(redis_server.url, lambda s: s.blocked("brief")) == 0,
               "the brief block to end", timeout=10)


def test_values_with_ttl(redis_server: RedisServer) -> None:
    async def scenario(s: RedisStore) -> list[str | None]:
        await s.put("v", "550 5.1.1 unknown user", 60)
        first = await s.get("v")
        await s.put("v", "other", 0)  # a ttl of 0 removes it
        return [first, await s.get("v"), await s.get("never")]

    assert once(redis_server.url, scenario) == ["550 5.1.1 unknown user", None, None]
    once(redis_server.url, lambda s: s.put("w", "x", 30))
    assert 0 < int(redis_server.command("PTTL", "t:v:w").lstrip(":")) <= 30_000


def test_limits_hold_across_two_stores(redis_server: RedisServer) -> None:
    """The Limits check of two proxies, each with its own RedisStore: the third message of a
    client network within the window is refused whichever proxy it reaches."""
    limit = Limit(name="msgs", count="messages", per="client_net", max=2, window=60)

    async def scenario() -> list[Action | None]:
        a, b = store(redis_server.url), store(redis_server.url)
        checks = [Pipeline([Limits([limit], a)]), Pipeline([Limits([limit], b)])]
        session = SessionInfo("s", "192.0.2.7", 1234)
        verdicts = []
        for pipeline in (checks[0], checks[1], checks[0], checks[1]):
            verdict = await pipeline.mail(session, Envelope(sender="x@example.org"))
            verdicts.append(None if verdict is None else verdict.action)
        other = await checks[1].mail(SessionInfo("t", "192.0.2.8", 1), Envelope())
        verdicts.append(None if other is None else other.action)
        await a.close()
        await b.close()
        return verdicts

    assert run(scenario()) == [None, None, Action.TEMPFAIL, Action.TEMPFAIL, None]


def test_greylisting_and_recipient_cache_are_shared(redis_server: RedisServer) -> None:
    """A triplet greylisted by one proxy passes at another after the delay; a refusal one
    proxy's downstream gave is answered from the cache by the other."""
    now = [1_000_000.0]
    accepted = Reply(250, "2.1.5", "OK", source="downstream")
    unknown = Reply(550, "5.1.1", "no such user", source="downstream")

    async def scenario() -> list[tuple[int | None, str | None] | None]:
        a, b = store(redis_server.url), store(redis_server.url)
        try:
            grey_a = Greylist(a, delay=300, clock=lambda: now[0])
            grey_b = Greylist(b, delay=300, clock=lambda: now[0])
            session = SessionInfo("s", "192.0.2.7", 1)
            envelope = Envelope(sender="a@example.org")
            results = [await grey_a.on_rcpt_reply(session, envelope, "b@relay.test", accepted)]
            now[0] += 301
            results.append(await grey_b.on_rcpt_reply(session, envelope, "b@relay.test",
                                                      accepted))
            cache_a, cache_b = RecipientCache(a), RecipientCache(b)
            await cache_a.record("nobody@relay.test", unknown)
            results.append(await cache_b.refusal("nobody@relay.test"))
            results.append(await cache_b.refusal("somebody@relay.test"))
            return [None if v is None else (v.code, v.enhanced) for v in results]
        finally:
            await a.close()
            await b.close()

    assert run(scenario()) == [(451, "4.7.1"), None, (550, "5.1.1"), None]


def test_test_message_never_touches_shared_state(redis_server: RedisServer,
                                                 tmp_path: Path) -> None:
    """`relayproxy test-message` is a trial: it must not count towards the live limits."""
    (tmp_path / "limits.toml").write_text(
        '[[limit]]\nname = "m"\ncount = "messages"\nper = "client_net"\nmax = 1\n'
        'window = 60\n')
    config = tmp_path / "relayproxy.toml"
    config.write_text(toml_dumps(base_config(1, rules={"files": ["limits.toml"]},
                                             state={"redis_url": redis_server.url})))
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: trial\r\n\r\nbody\r\n")
    for _ in range(2):  # over max = 1 if it counted
        result = run_cli("test-message", "-c", str(config), "--client-ip", "192.0.2.9",
                         "--helo", "h.example", "--from", "a@example.org", "--to",
                         "b@relay.test", str(message))
        assert "verdict: accept" in result.stdout, result
    assert redis_server.command("DBSIZE") == ":0"


# ---------------------------------------------------------------------- Redis unavailable


def test_unreachable_redis_tempfails_and_is_counted(dead_url: str) -> None:
    connect, skipped = state_errors("connect"), state_errors("skipped")

    async def scenario(s: RedisStore) -> list[str]:
        failures = []
        for operation in (s.hit("k", 60), s.get("k")):
            try:
                await operation
            except StateUnavailable as exc:
                failures.append(str(exc))
        return failures

    assert once(dead_url, scenario, down_time=60) == [
        "shared state unavailable (connect)", "shared state unavailable (skipped)"]
    # within down_time Redis was not tried again: answered at once, counted as skipped
    assert state_errors("connect") == connect + 1
    assert state_errors("skipped") == skipped + 1


def test_every_operation_fails_alike(dead_url: str) -> None:
    async def scenario(s: RedisStore) -> list[bool]:
        fail_open = []
        for operation in (s.block("k", 60), s.put("k", "v", 60), s.hit("k", 60),
                          s.count("k", 60), s.blocked("k"), s.get("k"), s.put("k", "", 0)):
            with pytest.raises(StateUnavailable) as failed:
                await operation
            fail_open.append(failed.value.fail_open)
        return fail_open

    connect = state_errors("connect")
    assert once(dead_url, scenario, on_error="open", down_time=0) == [True] * 7
    assert state_errors("connect") == connect + 7


def test_silent_redis_times_out_within_the_bound(silent_url: str) -> None:
    timeouts = state_errors("timeout")
    with pytest.raises(StateUnavailable):  # run() itself fails the test if this hangs
        once(silent_url, lambda s: s.hit("k", 60), timeout=0.5, down_time=0)
    assert state_errors("timeout") == timeouts + 1


def test_redis_coming_back_is_used_again(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    caplog.set_level(logging.INFO, logger="relayproxy.state")
    redis = RedisServer(tmp_path).start()
    try:
        async def scenario(s: RedisStore) -> list[object]:
            results: list[object] = [await s.hit("k", 60)]
            redis.stop()
            try:
                await s.hit("k", 60)
            except StateUnavailable as exc:
                results.append(str(exc))
            redis.start(same_port=True)  # empty: no persistence
            results.append(await s.hit("k", 60))
            return results

        assert once(redis.url, scenario, down_time=0) == [
            1, "shared state unavailable (connect)", 1]
    finally:
        redis.stop()
    assert "state: Redis answers again" in caplog.text


def test_blocks_are_shared_by_the_limits_of_two_stores(redis_server: RedisServer) -> None:
    """A network one proxy blocked (block_for) is refused at connect by the other."""
    limit = Limit(name="probe", count="unknown_recipients", per="client_net", max=1,
                  window=600, block_for=300)
    unknown = Reply(550, "5.1.1", "no such user", source="downstream")

    async def scenario() -> list[tuple[int | None, str | None] | None]:
        a, b = store(redis_server.url), store(redis_server.url)
        try:
            session = SessionInfo("s", "192.0.2.7", 1)
            envelope = Envelope(sender="a@example.org")
            first, second = Pipeline([Limits([limit], a)]), Pipeline([Limits([limit], b)])
            verdicts = [
                await first.rcpt_reply(session, envelope, "x@relay.test", unknown),
                await first.rcpt_reply(session, envelope, "y@relay.test", unknown),
                await second.connect(SessionInfo("t", "192.0.2.7", 2)),
                await second.connect(SessionInfo("u", "192.0.2.8", 3)),
            ]
            return [None if v is None else (v.code, v.enhanced) for v in verdicts]
        finally:
            await a.close()
            await b.close()

    assert run(scenario()) == [None, (421, "4.7.0"), (421, "4.7.0"), None]


def test_pipeline_answers_state_failures_per_stage(dead_url: str) -> None:
    """tempfail: 451 4.3.0 at MAIL and RCPT, 421 4.3.0 at connect; open: the checks pass."""
    limits = [Limit(name="conns", count="connections", per="client_net", max=5, window=60),
              Limit(name="msgs", count="messages", per="client_net", max=5, window=60)]

    async def scenario(on_error: str) -> list[tuple[int | None, str | None] | None]:
        s = store(dead_url, on_error=on_error, down_time=0)
        pipeline = Pipeline([Limits(limits, s), Greylist(s, delay=60)])
        session = SessionInfo("s", "192.0.2.7", 1234)
        envelope = Envelope(sender="a@example.org")
        verdicts = [await pipeline.connect(session), await pipeline.mail(session, envelope),
                    await pipeline.rcpt_reply(session, envelope, "b@relay.test",
                                              Reply(250, "2.1.5", "OK", source="downstream"))]
        return [None if v is None else (v.code, v.enhanced) for v in verdicts]

    assert run(scenario("tempfail")) == [(421, "4.3.0"), (451, "4.3.0"), (451, "4.3.0")]
    assert run(scenario("open")) == [None, None, None]


# ---------------------------------------------------------------------- configuration


def test_state_config_and_store_choice(redis_server: RedisServer) -> None:
    assert isinstance(make_store(StateConfig()), MemoryStore)
    config = from_dict({"state": {"redis_url": redis_server.url, "on_error": "open",
                                  "timeout": 0.5, "key_prefix": "x:"}})
    made = make_store(config.state)
    assert isinstance(made, RedisStore)
    assert (made.on_error, made.timeout, made.prefix) == ("open", 0.5, "x:")
    with pytest.raises(ConfigError, match=r"^state.redis_url: "):
        from_dict({"state": {"redis_url": "http://localhost:6379"}})
    with pytest.raises(ConfigError, match=r"^state.on_error: "):
        from_dict({"state": {"on_error": "ignore"}})
    with pytest.raises(ConfigError, match=r"^server.proxy_trusted: "):
        from_dict({"server": {"proxy_trusted": ["10.0.0.0/33"]}})


# ---------------------------------------------------------------------- reload


def test_reload_moves_state_to_redis_and_keeps_it_while_unchanged(
    redis_server: RedisServer, tmp_path: Path,
    proxy_factory: Callable[..., ProxyProcess], scripted: Callable[..., ScriptedDownstream],
) -> None:
    downstream = scripted()
    (tmp_path / "limits.toml").write_text(
        '[[limit]]\nname = "m"\ncount = "messages"\nper = "client_net"\nmax = 1\n'
        'window = 3600\n')
    rules = {"files": [str(tmp_path / "limits.toml")]}
    in_memory = base_config(downstream.port, rules=rules)
    proxy = proxy_factory(in_memory)

    def mail() -> int:
        with RawSMTP() as client:
            client.connect(proxy.host, proxy.port)
            client.ehlo()
            code = client.cmd("MAIL FROM:<a@example.org>").code
            client.cmd("QUIT")
            return code

    assert [mail(), mail()] == [250, 451]  # in this process's memory
    shared = {**in_memory, "state": {"redis_url": redis_server.url}}
    proxy.reload(shared)
    proxy.wait_for_log("configuration reloaded", count=1)
    assert [mail(), mail()] == [250, 451]  # a new, empty store: Redis
    assert redis_server.command("EXISTS", "relayproxy:h:3600:limit:m:127.0.0.1/32") == ":1"
    proxy.reload({**shared, "server": {**shared["server"], "max_errors": 30}})
    proxy.wait_for_log("configuration reloaded", count=2)
    assert mail() == 451  # [state] unchanged: the same counters
