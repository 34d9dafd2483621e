"""The listener: accepts connections, enforces connection limits, runs sessions, and handles
the process lifecycle (SIGTERM drains, SIGHUP reloads the configuration atomically).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import Counter
from pathlib import Path

from . import config as config_module
from . import metrics, proxyproto, replies
from .config import Config, ConfigError
from .connection import ClientConnection
from .downstream import Pool
from .runtime import build_runtime
from .session import Session

log = logging.getLogger("relayproxy.server")


class Server:
    def __init__(self, config: Config, config_path: str | Path | None = None):
        self.runtime = build_runtime(config)
        self.config_path = config_path
        self._servers: list[asyncio.AbstractServer] = []
        self._sessions: dict[asyncio.Task[None], Session] = {}
        self._per_ip: Counter[str] = Counter()
        # connections still reading their PROXY header (server.proxy_protocol)
        self._handshakes: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._old_pools: list[Pool] = []
        metrics.MAX_CONNECTIONS.set(config.server.max_connections)

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def accepting(self) -> bool:
        """Listening and not draining (for /readyz)."""
        return bool(self._servers) and not self._stop.is_set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for hp in self.config.server.listen:
            server = await loop.create_server(
                lambda: ClientConnection(self._accept), hp.host, hp.port,
                reuse_address=True, backlog=1024,
            )
            self._servers.append(server)
            log.info("listening on %s", hp)

    def _accept(self, client: ClientConnection) -> None:
        metrics.CONNECTIONS.inc()
        limits = self.config.server
        if len(self._sessions) + len(self._handshakes) >= limits.max_connections:
            self._refuse(client, replies.TOO_MANY_CONNECTIONS, "max_connections")
            return
        if limits.proxy_protocol:
            # the per-address limit and the session wait for the real address
            task = asyncio.get_running_loop().create_task(self._proxied(client))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
            return
        self._admit(client)

    async def _proxied(self, client: ClientConnection) -> None:
        limits = self.config.server
        if not client.peer[0]:
            # reset before it was accepted, so nobody to read from: what a load balancer's
            # health check does (HAProxy's: LOCAL header, then RST), so it is not counted
            client.close()
            return
        try:
            real = await proxyproto.read_header(
                client, proxyproto.trusted_networks(limits.proxy_trusted), limits.proxy_timeout)
        except proxyproto.ProxyHeaderError as exc:
            metrics.PROXY_PROTOCOL_ERRORS.labels(exc.kind).inc()
            log.info("PROXY protocol %s from %s: %s; connection closed", exc.kind,
                     client.peer[0], exc)
            client.close()
            return
        except asyncio.CancelledError:  # shutting down
            client.close()
            raise
        except Exception:
            log.exception("PROXY protocol header from %s", client.peer[0])
            client.close()
            return
        if real is not None:
            client.peer = real
        self._admit(client)

    def _admit(self, client: ClientConnection) -> None:
        limits = self.config.server
        ip = client.peer[0]
        if self._per_ip[ip] >= limits.max_connections_per_ip:
            self._refuse(client, replies.TOO_MANY_FROM_IP, "max_connections_per_ip")
            return
        session = Session(self.runtime, client)
        task = asyncio.get_running_loop().create_task(session.run())
        self._sessions[task] = session
        self._per_ip[ip] += 1
        metrics.SESSIONS_ACTIVE.inc()
        task.add_done_callback(lambda t: self._session_done(t, ip))

    def _refuse(self, client: ClientConnection, reply: replies.Reply, reason: str) -> None:
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        client.write(reply.encode())
        client.close()

    def _session_done(self, task: asyncio.Task[None], ip: str) -> None:
        self._sessions.pop(task, None)
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        metrics.SESSIONS_ACTIVE.dec()
        if not task.cancelled() and task.exception() is not None:
            log.error("session crashed", exc_info=task.exception())

    # lifecycle

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def serve(self) -> None:
        await self._stop.wait()
        await self.drain()

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP ignored: no configuration file to reload")
            return
        try:
            new = config_module.load(self.config_path)
            runtime = build_runtime(new, self.runtime)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("failed").inc()
            metrics.CONFIG_LAST_RELOAD_OK.set(0)
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        if new.server.listen != self.config.server.listen:
            log.warning("server.listen changed: takes effect at the next restart")
        if new.metrics.listen != self.config.metrics.listen:
            log.warning("metrics.listen changed: takes effect at the next restart")
        if runtime.pool is not self.runtime.pool:
            self._old_pools.append(self.runtime.pool)
            self.runtime.pool.close_idle()
        self.runtime = runtime
        metrics.CONFIG_RELOADS.labels("ok").inc()
        metrics.CONFIG_LAST_RELOAD_OK.set(1)
        metrics.MAX_CONNECTIONS.set(new.server.max_connections)
        log.info("configuration reloaded from %s", self.config_path)

    async def drain(self) -> None:
        """Stop accepting; let transactions in flight finish for up to drain_timeout."""
        for server in self._servers:
            server.close()
        for handshake in list(self._handshakes):
            handshake.cancel()  # nothing said yet: closed without a word
        sessions = self._sessions
        log.info("shutting down: %d sessions open", len(sessions))
        for task, session in list(sessions.items()):
            session.stopping = True
            if not session.in_transaction:
                task.cancel()  # idle between transactions: 421 now
        if sessions:
            await asyncio.wait(list(sessions), timeout=self.config.server.drain_timeout)
        # Past the deadline: 421 to the rest; their downstreams never get the dot. A session
        # whose dot is already downstream waits for that reply, or the client could be told
        # 4xx for a message that was delivered (and send it twice).
        for task, session in list(sessions.items()):
            if not session.in_dot_window:
                task.cancel()
        if sessions:
            await asyncio.wait(
                list(sessions), timeout=self.config.downstream.data_timeout + 1
            )
        for pool in [*self._old_pools, self.runtime.pool]:
            pool.close_all()
        for server in self._servers:
            await server.wait_closed()
        log.info("stopped")
