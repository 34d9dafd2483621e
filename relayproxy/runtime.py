"""Everything a session needs that is built from one configuration.

A session keeps the Runtime it started with, so a reload never changes the rules in the middle
of a conversation. Built by the server at start and at each SIGHUP; read by sessions.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from .checks import Pipeline, build_pipeline
from .config import Config, ConfigError
from .dns import ClientNames, make_resolver
from .downstream import Pool


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    pipeline: Pipeline
    pool: Pool
    names: ClientNames  # reverse DNS of clients, cached
    tls_context: ssl.SSLContext | None


def build_runtime(config: Config, previous: Runtime | None = None) -> Runtime:
    """The runtime for config; the downstream pool and DNS cache carry over when unchanged."""
    pool = previous.pool if previous and previous.config.downstream == config.downstream and (
        previous.config.downstream_helo == config.downstream_helo) else None
    names = previous.names if previous and previous.config.dns == config.dns else None
    return Runtime(
        config=config,
        pipeline=build_pipeline(config),
        pool=pool or Pool(config.downstream, config.downstream_helo),
        names=names or ClientNames(make_resolver(config.dns)),
        tls_context=server_tls_context(config) if config.tls.enabled else None,
    )


def server_tls_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert: cannot load certificate/key: {exc}") from None
    return context
