"""The operations endpoint on `metrics.listen`: /metrics, /healthz and /readyz over HTTP/1.1.

It is served by the event loop that runs the SMTP sessions, not by a thread of its own: a
liveness probe must fail when that loop is wedged, and a thread (prometheus-client's
start_http_server) would go on answering. Three GET paths and one response per connection do
not need a web framework; the request is bounded (REQUEST_LIMIT bytes, READ_TIMEOUT seconds)
and so is the number of requests served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

log = logging.getLogger("relayproxy.endpoint")

REQUEST_LIMIT = 8192  # request line and header fields together
READ_TIMEOUT = 5.0
MAX_CLIENTS = 64  # scrapers and probes; more at once are closed unanswered


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Response]


class Endpoint:
    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        self._clients = 0

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._handle, host, port, limit=REQUEST_LIMIT, reuse_address=True
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            response, head_only = await self._respond(reader)
            if response is not None:
                writer.write(_encode(response, head_only))
                async with asyncio.timeout(READ_TIMEOUT):
                    await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away or stopped reading: nothing to tell it
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[Response | None, bool]:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), False
        except (asyncio.IncompleteReadError, TimeoutError):
            return None, False
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _plain(HTTPStatus.BAD_REQUEST), False
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        route = self.routes.get(target.decode("ascii", "replace"))
        if route is None:
            return _plain(HTTPStatus.NOT_FOUND), False
        if method not in (b"GET", b"HEAD"):
            return _plain(HTTPStatus.METHOD_NOT_ALLOWED), False
        return route(), method == b"HEAD"


def _plain(status: HTTPStatus, text: str = "") -> Response:
    return Response(status, (text or status.phrase).encode() + b"\n")


def text(status: HTTPStatus, message: str) -> Response:
    return _plain(status, message)


def _encode(response: Response, head_only: bool) -> bytes:
    extra = "Allow: GET, HEAD\r\n" if response.status == HTTPStatus.METHOD_NOT_ALLOWED else ""
    head = (
        f"HTTP/1.1 {response.status.value} {response.status.phrase}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        f"Cache-Control: no-store\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + response.body


async def serve_operations(host: str, port: int, unready_reason: Callable[[], str | None]
                           ) -> asyncio.Server:
    """/metrics, /healthz (the event loop answers) and /readyz (unready_reason() is None)."""
    from . import metrics

    def scrape() -> Response:
        body, content_type = metrics.scrape()
        return Response(HTTPStatus.OK, body, content_type)

    def ready() -> Response:
        reason = unready_reason()
        if reason is None:
            return text(HTTPStatus.OK, "ready")
        return text(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}")

    routes: dict[str, Route] = {
        "/metrics": scrape,
        "/healthz": lambda: text(HTTPStatus.OK, "alive"),
        "/readyz": ready,
    }
    return await Endpoint(routes).start(host, port)
