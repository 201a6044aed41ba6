"""Hosts and stores that fail the way real ones do, for tests.

`faulty_host`: an HTTP host on 127.0.0.1 that behaves like the hosts collections live on:
it refuses generic library User-Agents, answers 503 and 429 now and then, trickles, loops,
resets connections, and sends bodies far over any byte cap. Every route counts requests.
`flaky_filesystem`: an fsspec filesystem whose reads fail transiently, as a bucket's do.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import fsspec
import pytest
from aiohttp import web

from transforms import fetch

PAINTING = bytes(range(256)) * 40  # stands in for an image where fetching is all that matters


@dataclass
class Host:
    """What the server saw: requests per (method, path), and the most in flight at once."""

    url: str
    files: dict[str, bytes] = field(default_factory=dict)  # served at /files/NAME
    release: threading.Event = field(default_factory=threading.Event)  # for /held/NAME
    requests: Counter = field(default_factory=Counter)
    in_flight: int = 0
    most_in_flight: int = 0
    bytes_sent: int = 0

    def gets(self, path: str) -> int:
        return self.requests["GET", path]


def make_app(host: Host) -> web.Application:
    """Routes named for how they behave; each counts its requests in `host`."""

    @web.middleware
    async def count(request: web.Request, handler):
        host.requests[request.method, request.path] += 1
        if request.path.startswith("/download/"):  # a bucket's emulator, for gcsfs
            return web.Response(status=503)
        if not request.headers.get("User-Agent", "").startswith("artstyle/"):
            # Like Wikimedia since 2025: generic library User-Agents are refused.
            return web.Response(status=403, text="Please comply with the User-Agent policy.")
        host.in_flight += 1
        host.most_in_flight = max(host.most_in_flight, host.in_flight)
        try:
            return await handler(request)
        finally:
            host.in_flight -= 1

    async def painting(request):
        return web.Response(body=PAINTING)

    async def files(request):
        name = request.match_info["name"]
        if name not in host.files:
            return web.Response(status=404)
        return web.Response(body=host.files[name])

    async def held(request):
        """/files/NAME's answer, once the test sets `release` (or after 30 s)."""
        await asyncio.get_running_loop().run_in_executor(None, host.release.wait, 30)
        return await files(request)

    async def unknown(request):
        return web.Response(status=404)

    async def slow(request):
        await asyncio.sleep(0.2)
        return web.Response(body=PAINTING)

    async def first_time(status: int, request, **headers) -> web.Response:
        if host.gets(request.path) == 1:
            return web.Response(status=status, headers=headers)
        return web.Response(body=PAINTING)

    async def flaky(request):
        return await first_time(503, request)

    async def throttled(request):
        return await first_time(429, request, **{"Retry-After": "1"})

    async def down(request):
        return web.Response(status=503)

    async def missing(request):
        return web.Response(status=404)

    async def loop(request):
        raise web.HTTPFound(request.path)

    async def redirect(request):
        """To wherever `?to=` says: another scheme, or another host."""
        raise web.HTTPFound(request.query["to"])

    async def trickle(request):
        response = web.StreamResponse()
        await response.prepare(request)
        while True:  # one byte every half second, for ever: each read arrives in time
            await response.write(b"x")
            await asyncio.sleep(0.5)

    async def reset(request):
        """Half the body, then the connection dropped: the first time only."""
        if host.gets(request.path) > 1:
            return web.Response(body=PAINTING)
        response = web.StreamResponse(headers={"Content-Length": str(len(PAINTING))})
        await response.prepare(request)
        await response.write(PAINTING[: len(PAINTING) // 2])
        request.transport.close()
        return response

    async def endless(request):
        """100 MB, without saying so up front, sent only as fast as it is read."""
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"\0" * 2**16
        for _ in range(100 * 2**20 // len(chunk)):
            await response.write(chunk)
            host.bytes_sent += len(chunk)
        return response

    async def declared_huge(request):
        response = web.StreamResponse(headers={"Content-Length": str(100 * 2**20)})
        await response.prepare(request)
        await response.write(b"\0" * 2**16)
        host.bytes_sent += 2**16
        return response

    app = web.Application(middlewares=[count])
    for path, handler in {
        "/painting.jpg": painting,
        "/slow/{n}.jpg": slow,
        "/flaky.jpg": flaky,
        "/throttled.jpg": throttled,
        "/down.jpg": down,
        "/missing.jpg": missing,
        "/loop.jpg": loop,
        "/redirect.jpg": redirect,
        "/trickle.jpg": trickle,
        "/reset.jpg": reset,
        "/endless.jpg": endless,
        "/declared_huge.jpg": declared_huge,
        "/files/{name}": files,
        "/held/{name}": held,
        "/{tail:.*}": unknown,
    }.items():
        app.router.add_get(path, handler)
    return app


@pytest.fixture
def faulty_host() -> Iterator[Host]:
    """A server on 127.0.0.1, on its own event loop in a thread, for one test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    host = Host(url="")

    async def start() -> web.AppRunner:
        runner = web.AppRunner(make_app(host), shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result()
    yield host
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


class FlakyFileSystem(fsspec.AbstractFileSystem):
    """Serves `content` for any path; fails the first `failures` reads of each path with a
    connection reset, as an object store under load does."""

    protocol = "flakytest"
    content = PAINTING
    failures = 1
    reads: ClassVar[Counter] = Counter()

    def cat_file(self, path, start=None, end=None, **kwargs):
        type(self).reads[path] += 1
        if type(self).reads[path] <= type(self).failures:
            raise ConnectionResetError("connection reset by peer")
        return type(self).content[start:end]


@pytest.fixture
def flaky_filesystem(monkeypatch) -> type[FlakyFileSystem]:
    """`flakytest://` URIs, read through FlakyFileSystem, for one test."""
    fsspec.register_implementation("flakytest", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(FlakyFileSystem, "reads", Counter())
    fetch._filesystem.cache_clear()
    return FlakyFileSystem
