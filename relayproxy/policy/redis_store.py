"""A Store in Redis, shared by several proxies: limits hold across them (`[state] redis_url`).

Each operation is one atomic command or Lua script, and every key expires by itself:
  - hit/count: the same sliding window as MemoryStore (relayproxy.policy.state), a ring of
    `buckets` sub-window counters, kept as one hash per key (field: the sub-window's number)
    and updated by one script, so concurrent hits from several proxies never lose a count and
    a key costs at most `buckets` fields however fast it is hit (a sorted set of events would
    grow with every refused event of a client that keeps hammering). Time is the Redis
    server's (TIME), so proxies whose clocks differ still agree on the window. The key names
    its window: a limit whose window changes at a reload starts over instead of reading
    sub-windows of another width.
  - block/blocked: a key with a PX expiry; a longer block already there is kept (a script).
  - get/put: SET with PX, GET.
Keys are `<key_prefix>h:<window>:<key>`, `<key_prefix>b:<key>` and `<key_prefix>v:<key>`.

Failures never hang a session: each operation is bounded by `timeout` (connecting, waiting
for one of the pool's `max_connections`, the command), with no retries. A failed operation is
counted (relayproxy_state_errors_total by kind), logged once when Redis goes away and once when
it is back, and raises StateUnavailable, which the checks' pipeline answers per `on_error`:
"tempfail" 451 4.3.0 (421 4.3.0 at connect), "open" lets the check pass (a limit, the
recipient cache or greylisting: none of them can decide without its state; answering as an
empty store would greylist every recipient). For `down_time`
seconds after a failure Redis is not tried at all (kind "skipped"), so a Redis that does not
answer costs one timeout, not one per operation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .. import metrics
from .state import StateUnavailable

log = logging.getLogger("relayproxy.state")

# KEYS[1] the hash; ARGV: window (seconds), buckets, amount (0: count only)
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local buckets = tonumber(ARGV[2])
local width = tonumber(ARGV[1]) / buckets
local current = math.floor(now / width)
local amount = tonumber(ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local n = tonumber(fields[i])
  if n == nil or n <= current - buckets or n > current then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    total = total + tonumber(fields[i + 1])
  end
end
if amount > 0 then
  redis.call('HINCRBY', KEYS[1], string.format('%d', current), amount)
  total = total + amount
  -- the newest event leaves the window with the sub-window it is in; floor, not ceil: a
  -- float product a hair above the boundary must not keep the key past now + window
  local expires = math.floor((current + buckets) * width * 1000)
  redis.call('PEXPIREAT', KEYS[1], string.format('%d', expires))
end
return total
"""

# KEYS[1] the block; ARGV[1] its length in milliseconds
_BLOCK = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 0
"""


class RedisStore:
    """The Store interface over Redis (see the module docstring)."""

    def __init__(self, url: str, *, key_prefix: str = "relayproxy:", timeout: float = 1.0,
                 max_connections: int = 20, on_error: str = "tempfail", down_time: float = 2.0,
                 buckets: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        if on_error not in ("tempfail", "open"):
            raise ValueError("on_error: must be tempfail or open")
        if buckets < 1:
            raise ValueError("buckets: must be at least 1")
        self.prefix = key_prefix
        self.timeout = timeout
        self.on_error = on_error
        self.down_time = down_time
        self.buckets = buckets
        self.clock = clock
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            decode_responses=True)
        # the client owns the pool: it is disconnected when the client is closed or collected
        # (a store a reload replaced goes once the last session using it has ended)
        self.redis = redis.asyncio.Redis.from_pool(pool)
        self._hit = self.redis.register_script(_HIT)
        self._block = self.redis.register_script(_BLOCK)
        self._down_until = 0.0
        self._failing = False

    async def hit(self, key: str, window: float, amount: int = 1) -> int:
        if window <= 0:
            raise ValueError("window: must be positive")
        result = await self._call(
            self._hit(keys=[self._window_key(key, window)],
                      args=[repr(float(window)), self.buckets, amount]))
        return int(result)

    async def count(self, key: str, window: float) -> int:
        result = await self._call(
            self._hit(keys=[self._window_key(key, window)],
                      args=[repr(float(window)), self.buckets, 0]))
        return int(result)

    async def block(self, key: str, seconds: float) -> None:
        ms = max(1, round(seconds * 1000))
        await self._call(self._block(keys=[self.prefix + "b:" + key], args=[ms]))

    async def blocked(self, key: str) -> float:
        ms = await self._call(self.redis.pttl(self.prefix + "b:" + key))
        return max(0, int(ms)) / 1000

    async def get(self, key: str) -> str | None:
        value = await self._call(self.redis.get(self.prefix + "v:" + key))
        return None if value is None else str(value)

    async def put(self, key: str, value: str, ttl: float) -> None:
        name = self.prefix + "v:" + key
        if ttl > 0:
            await self._call(self.redis.set(name, value, px=max(1, round(ttl * 1000))))
        else:
            await self._call(self.redis.delete(name))

    async def close(self) -> None:
        await self.redis.aclose()

    def _window_key(self, key: str, window: float) -> str:
        return f"{self.prefix}h:{window:g}:{key}"

    async def _call(self, operation: Awaitable[Any]) -> Any:
        """The operation's result; StateUnavailable if Redis did not give it."""
        if self._down_until and self.clock() < self._down_until:
            _close(operation)
            raise self._failed("skipped")
        try:
            async with asyncio.timeout(self.timeout):
                result = await operation
        except (TimeoutError, redis.exceptions.TimeoutError):
            raise self._failed("timeout") from None
        except (redis.exceptions.ConnectionError, OSError):
            raise self._failed("connect") from None
        except redis.exceptions.RedisError as exc:
            log.warning("state: Redis error: %s", exc)
            raise self._failed("error") from None
        if self._failing:
            self._failing = False
            log.info("state: Redis answers again")
        self._down_until = 0.0
        return result

    def _failed(self, kind: str) -> StateUnavailable:
        metrics.STATE_ERRORS.labels(kind).inc()
        if kind != "skipped":
            self._down_until = self.clock() + self.down_time
            if not self._failing:
                self._failing = True
                log.warning("state: Redis unavailable (%s): answering %s for %gs, then trying "
                            "again", kind, self.on_error, self.down_time)
        return StateUnavailable(f"shared state unavailable ({kind})",
                                fail_open=self.on_error == "open")


def _close(operation: Awaitable[Any]) -> None:
    # a coroutine made but never awaited would warn at garbage collection
    close = getattr(operation, "close", None)
    if close is not None:
        close()
