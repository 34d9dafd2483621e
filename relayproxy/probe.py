"""Active health checking of the downstream servers, and the readiness it feeds.

Every `downstream.probe_interval` seconds each server gets a connection that waits for the
greeting and says QUIT: the cheapest exchange that proves the mail server (not just its port)
answers. The result sets `relayproxy_downstream_up{server}` and marks the server down (as a
failed connection does, for `downstream.down_time`) or up again at once, so a server that
comes back takes traffic without waiting out its down time. /readyz is ready while the proxy
listens, has its configuration, and some server answered a probe recently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiosmtplib

from . import metrics
from .config import Config, HostPort

if TYPE_CHECKING:
    from .downstream import Pool

log = logging.getLogger("relayproxy.probe")


class DownstreamProbe:
    def __init__(self, config: Callable[[], Config], pool: Callable[[], Pool]):
        # read at each round: a reload may change the servers, the interval or the pool
        self._config = config
        self._pool = pool
        self._answered: dict[HostPort, float] = {}  # server -> when it last answered
        self._up: dict[HostPort, bool] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _deadline(self, config: Config) -> float:
        down = config.downstream
        return down.connect_timeout + down.command_timeout

    def unready_reason(self) -> str | None:
        """None when some downstream answered its latest probe, and that within the probe
        interval (plus the time a probe may take: a stuck prober is not a healthy one);
        otherwise why not."""
        config = self._config()
        interval = config.downstream.probe_interval
        if interval == 0:
            return None  # probing is off: readiness does not depend on the downstream
        oldest = asyncio.get_running_loop().time() - interval - self._deadline(config)
        if any(self._up.get(s) and self._answered[s] >= oldest
               for s in config.downstream.servers):
            return None
        if not self._up:
            return "no downstream probed yet"
        return f"no downstream answered a probe in the last {interval:g} s"

    async def _run(self) -> None:
        while True:
            config = self._config()
            interval = config.downstream.probe_interval
            if interval == 0:
                self._forget(set())
                await asyncio.sleep(1.0)  # off; look again for a reload that turns it on
                continue
            try:
                await self.probe_all()
            except Exception:
                # a dead prober would leave the proxy unready for good: log, and go on
                log.exception("downstream probe failed")
            await asyncio.sleep(interval)

    async def probe_all(self) -> None:
        config = self._config()
        servers = config.downstream.servers
        self._forget(set(servers))
        results = await asyncio.gather(*(self._probe(s, config) for s in servers))
        pool = self._pool()
        now = asyncio.get_running_loop().time()
        for server, ok in zip(servers, results, strict=True):
            if ok:
                self._answered[server] = now
            was = self._up.get(server)
            self._up[server] = ok
            metrics.DOWNSTREAM_UP.labels(str(server)).set(1 if ok else 0)
            pool.probed(server, ok)
            if was is not None and was != ok:
                log.warning("downstream %s is %s", server, "up again" if ok else "down")
            elif was is None and not ok:
                log.warning("downstream %s is down", server)

    def _forget(self, keep: set[HostPort]) -> None:
        """Servers a reload removed lose their series (a stale 0 would fire an alert)."""
        for server in [s for s in self._up if s not in keep]:
            del self._up[server]
            self._answered.pop(server, None)
            with contextlib.suppress(KeyError):
                metrics.DOWNSTREAM_UP.remove(str(server))

    async def _probe(self, server: HostPort, config: Config) -> bool:
        smtp = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, local_hostname=config.downstream_helo,
            timeout=config.downstream.command_timeout, start_tls=False, use_tls=False,
        )
        try:
            async with asyncio.timeout(self._deadline(config)):
                await smtp.connect(timeout=config.downstream.connect_timeout)
                with contextlib.suppress(aiosmtplib.SMTPException):
                    await smtp.quit()  # its answer (or none) says nothing about health
            return True
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.debug("downstream %s probe failed: %s", server, exc)
            return False
        finally:
            smtp.close()
