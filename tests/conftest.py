"""Shared fixtures: a session-wide private Postfix, and factories for proxies, scripted
downstream servers and DNS servers that are all stopped (by PID) at teardown."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dns import DNSMASQ, DnsServer
from support.haproxy import HAPROXY, HAProxy, reserved_port
from support.ports import LOOPBACK
from support.postfix import POSTFIX, PostfixInstance
from support.proxy import ProxyProcess
from support.redisd import REDIS_SERVER, RedisServer
from support.scanners import CLAMD, RSPAMD, SPAMD, Clamd, Daemon, Rspamd, Spamd
from support.scripted import ScriptedDownstream
from support.sink import CountingSink

_INSTALL_HINT = (
    "run the test command from README.md: it installs Postfix, dnsmasq, swaks, haproxy and "
    "redis-server and runs the suite as root"
)


# Fixtures register (title, log reader) pairs here; a failing test's report then carries
# those logs as extra sections, so a failure shows what the proxy/Postfix/dnsmasq said.
_LOG_SOURCES = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()


def _add_log_source(request: pytest.FixtureRequest, title: str, read: Callable[[], str]) -> None:
    request.node.stash.setdefault(_LOG_SOURCES, []).append((title, read))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for title, read in item.stash.get(_LOG_SOURCES, []):
            try:
                text = read()
            except OSError as exc:
                text = f"(unreadable: {exc})"
            report.sections.append((title, text))
    return report


@pytest.fixture(scope="session")
def postfix() -> Iterator[PostfixInstance]:
    """One private Postfix (smtpd on 127.0.0.1:<port>, domain relay.test) per session."""
    if not Path(POSTFIX).exists():
        pytest.fail(f"{POSTFIX} is missing: {_INSTALL_HINT}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail(f"the private Postfix must be started as root: {_INSTALL_HINT}",
                    pytrace=False)
    instance = PostfixInstance()
    try:
        instance.start()
        yield instance
    finally:
        # stop() also covers a half-started instance (master up, smtpd not answering).
        instance.stop()
    instance.remove()


@pytest.fixture
def mailboxes(request: pytest.FixtureRequest, postfix: PostfixInstance) -> PostfixInstance:
    """The session Postfix with an empty queue and empty mailboxes."""
    postfix.reset()
    _add_log_source(request, "postfix maillog (tail)", lambda: postfix.log_tail(60))
    return postfix


@pytest.fixture
def proxy_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ProxyProcess]]:
    """``proxy_factory(config, *, wait_ready=True, extra_args=(), env=None)`` -> started
    ProxyProcess. All are stopped at teardown; a failing test's report shows their logs."""
    started: list[ProxyProcess] = []

    def make(
        config: dict[str, Any] | str, *, wait_ready: bool = True, **kwargs: Any
    ) -> ProxyProcess:
        proxy = ProxyProcess(config, workdir=tmp_path_factory.mktemp("proxy"), **kwargs)
        started.append(proxy)
        _add_log_source(request, f"proxy log {proxy.log_path} (tail)",
                        lambda: proxy.log_tail(80))
        return proxy.start(wait_ready=wait_ready)

    yield make
    for proxy in started:
        if proxy.process is not None:
            proxy.stop()


@pytest.fixture
def scripted(request: pytest.FixtureRequest) -> Iterator[Callable[..., ScriptedDownstream]]:
    """``scripted(script=None, **kwargs)`` -> started ScriptedDownstream; stopped at teardown."""
    servers: list[ScriptedDownstream] = []

    def make(script: dict[str, Any] | None = None, **kwargs: Any) -> ScriptedDownstream:
        server = ScriptedDownstream(script, **kwargs)
        servers.append(server)
        _add_log_source(request, "scripted server state", server.describe)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def dns_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., DnsServer]]:
    """``dns_server(ptr=None, a=None, txt=None)`` -> started dnsmasq; stopped at teardown."""
    if not Path(DNSMASQ).exists():
        pytest.fail(f"{DNSMASQ} is missing: {_INSTALL_HINT}", pytrace=False)
    servers: list[DnsServer] = []

    def make(**kwargs: Any) -> DnsServer:
        server = DnsServer(workdir=tmp_path_factory.mktemp("dns"), **kwargs)
        servers.append(server)
        _add_log_source(request, "dnsmasq log (tail)", lambda: server.log_text()[-4000:])
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server (loopback, no persistence) per test session."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail(f"{REDIS_SERVER} is missing: {_INSTALL_HINT}", pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, redis_session: RedisServer) -> RedisServer:
    """The session's Redis, emptied."""
    redis_session.flush()
    _add_log_source(request, "redis log (tail)", lambda: redis_session.log_text()[-4000:])
    return redis_session


@pytest.fixture(scope="session")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    """One private HAProxy per session (TCP mode, round robin, send-proxy-v2) in front of two
    loopback ports, haproxy.backends, where a test starts its relayproxy instances."""
    if not Path(HAPROXY).exists():
        pytest.fail(f"{HAPROXY} is missing: {_INSTALL_HINT}", pytrace=False)
    first = reserved_port()
    server = HAProxy([(LOOPBACK, first), (LOOPBACK, reserved_port(exclude=[first]))],
                     tmp_path_factory.mktemp("haproxy"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def counting_sink() -> Iterator[CountingSink]:
    sink = CountingSink().start()
    yield sink
    sink.stop()


# ---------------------------------------------------------------------- content scanners


@pytest.fixture(scope="session")
def scanner_daemons() -> Iterator[dict[str, Daemon]]:
    """clamd, spamd and rspamd, each a private instance on loopback, started together once
    per session (rspamd takes ~20 s to come up on 2 cores). A daemon whose package is not
    installed is left out: its tests skip (tests/run.sh installs the packages)."""
    daemons: dict[str, Daemon] = {}
    for name, binary, cls in (("clamd", CLAMD, Clamd), ("spamd", SPAMD, Spamd),
                              ("rspamd", RSPAMD, Rspamd)):
        if Path(binary).exists():
            daemons[name] = cls().start()
    try:
        yield daemons
    finally:
        for daemon in daemons.values():
            daemon.stop()


def _scanner(daemons: dict[str, Daemon], name: str, request: pytest.FixtureRequest) -> Daemon:
    daemon = daemons.get(name)
    if daemon is None:
        pytest.skip(f"{name} is not installed (Debian package: tests/run.sh installs it)")
    _add_log_source(request, f"{name} log (tail)", daemon.log_tail)
    return daemon.wait_ready()


@pytest.fixture
def clamd(scanner_daemons: dict[str, Daemon], request: pytest.FixtureRequest) -> Daemon:
    return _scanner(scanner_daemons, "clamd", request)


@pytest.fixture
def spamd(scanner_daemons: dict[str, Daemon], request: pytest.FixtureRequest) -> Daemon:
    return _scanner(scanner_daemons, "spamd", request)


@pytest.fixture
def rspamd(scanner_daemons: dict[str, Daemon], request: pytest.FixtureRequest) -> Daemon:
    return _scanner(scanner_daemons, "rspamd", request)
