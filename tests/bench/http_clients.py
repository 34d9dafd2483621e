#!/usr/bin/env python3
"""The client side's CPU for one rspamd /checkv2 request, as relayproxy makes it (a 4 KB
message as a chunked body fed through a queue, the envelope as headers), by HTTP client.
Not collected by pytest; httpx and httpcore are not dependencies (pip install them to compare).

    .venv/bin/python tests/bench/scanners.py serve --toml /tmp/scanners.toml &  # rspamd's port
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python tests/bench/http_clients.py aiohttp 250 PORT
    # instructions per request: (Collected at 250 - Collected at 50) / 200

MODE: aiohttp (what relayproxy uses), httpx (what it used), httpcore (httpx's transport alone).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvloop

HEAD = (b"From: s@bench.test\r\nTo: r@bench.test\r\nSubject: hello\r\n"
        b"Message-ID: <x@bench.test>\r\n\r\n")
BODY = HEAD + (b"p" * 78 + b"\r\n") * 50  # about 4 KB
ENVELOPE = [("IP", "127.0.0.1"), ("Queue-Id", "abc"), ("Helo", "bench.test"),
            ("From", "s@bench.test"), ("Rcpt", "r@bench.test")]


async def parts(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (part := await queue.get()) is not None:
        yield part


def client(mode: str, url: str, port: int) -> Callable[[AsyncIterator[bytes]], Awaitable[Any]]:
    """One request's coroutine function for the mode, its client made once."""
    if mode == "httpx":
        import httpx
        pool = httpx.AsyncClient(timeout=httpx.Timeout(10), headers={"User-Agent": "bench"},
                                 limits=httpx.Limits(max_connections=None))

        async def via_httpx(body: AsyncIterator[bytes]) -> Any:
            response = await pool.post(url, content=body, headers=ENVELOPE)
            return response.json()
        return via_httpx
    if mode == "httpcore":
        import httpcore
        transport = httpcore.AsyncConnectionPool(max_connections=None)
        headers = [("Host", f"127.0.0.1:{port}"), ("User-Agent", "bench"),
                   ("Transfer-Encoding", "chunked"), *ENVELOPE]

        async def chunked(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            async for part in body:
                yield b"%x\r\n%s\r\n" % (len(part), part)
            yield b"0\r\n\r\n"

        async def via_httpcore(body: AsyncIterator[bytes]) -> Any:
            response = await transport.request("POST", url, headers=headers,
                                               content=chunked(body))
            return json.loads(response.content)
        return via_httpcore
    import aiohttp
    session = aiohttp.ClientSession(headers={"User-Agent": "bench"},
                                    skip_auto_headers=("Accept", "Accept-Encoding"),
                                    connector=aiohttp.TCPConnector(limit=0))

    async def via_aiohttp(body: AsyncIterator[bytes]) -> Any:
        async with session.post(url, data=body, headers=ENVELOPE) as response:
            return json.loads(await response.read())
    return via_aiohttp


async def main(mode: str, n: int, port: int) -> None:
    request = client(mode, f"http://127.0.0.1:{port}/checkv2", port)

    async def one() -> Any:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(2)
        task = asyncio.get_running_loop().create_task(request(parts(queue)))
        await queue.put(BODY)
        await queue.put(None)
        return await task

    answer = await one()
    assert "action" in answer, answer
    started = time.process_time()
    for _ in range(n):
        await one()
    print(f"{mode}: {(time.process_time() - started) * 1000 / n:.2f} ms CPU per request",
          file=sys.stderr)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
