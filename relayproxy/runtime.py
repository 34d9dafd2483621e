"""Everything a session needs that is built from one configuration.

A session keeps the Runtime it started with, so a reload never changes the rules in the middle
of a conversation. Built by the server at start and at each SIGHUP; read by sessions.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from .checks import Pipeline
from .config import Config, ConfigError, StateConfig
from .dns import ClientNames, make_resolver
from .downstream import Pool
from .pipeline import Services, build_pipeline
from .policy.dnsbl import Dnsbl
from .policy.state import MemoryStore, Store


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    pipeline: Pipeline
    pool: Pool
    services: Services  # DNS (with its cache), DNSBL, limit state: shared by the checks
    tls_context: ssl.SSLContext | None

    @property
    def names(self) -> ClientNames:
        return self.services.names


def build_runtime(config: Config, previous: Runtime | None = None, trace: bool = False
                  ) -> Runtime:
    """The runtime for config; what holds state (the downstream pool, DNS caches, limit
    counters) carries over a reload when its configuration did not change."""
    pool = previous.pool if previous and previous.config.downstream == config.downstream and (
        previous.config.downstream_helo == config.downstream_helo) else None
    same_state = previous is not None and previous.config.state == config.state
    services = previous.services if previous and previous.config.dns == config.dns and (
        same_state) else None
    if services is None:
        resolver = make_resolver(config.dns)
        store = previous.services.store if previous and same_state else make_store(config.state)
        services = Services(resolver, ClientNames(resolver), Dnsbl(resolver), store)
    return Runtime(
        config=config,
        pipeline=build_pipeline(config, services, trace),
        pool=pool or Pool(config.downstream, config.downstream_helo),
        services=services,
        tls_context=server_tls_context(config) if config.tls.enabled else None,
    )


def make_store(config: StateConfig) -> Store:
    """Redis with state.redis_url (shared by every proxy using it), else this process's
    memory."""
    if not config.redis_url:
        return MemoryStore()
    from .policy.redis_store import RedisStore  # the redis package only when it is used

    try:
        return RedisStore(config.redis_url, key_prefix=config.key_prefix, timeout=config.timeout,
                          max_connections=config.max_connections, on_error=config.on_error,
                          down_time=config.down_time)
    except ValueError as exc:  # redis-py's URL parsing
        raise ConfigError(f"state.redis_url: {exc}") from None


def server_tls_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert: cannot load certificate/key: {exc}") from None
    return context
