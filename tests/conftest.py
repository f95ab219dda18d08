"""Shared test harness: drive an app's ASGI lifespan, or serve it with a real Hypercorn."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from redis_server import durable_redis_server, redis_server  # fixtures

from trio_bg._web.middleware import ASGIApp, Message

__all__ = ["durable_redis_server", "redis_server"]


@dataclass
class Lifespan:
    """The server's side of an ASGI lifespan, as the tests see it."""

    sent: list[Message] = field(default_factory=list)  # what the app sent to the server


class StartupFailed(Exception):
    """The app answered lifespan.startup with something other than complete."""


@asynccontextmanager
async def run_lifespan(app: ASGIApp) -> AsyncIterator[Lifespan]:
    """Send lifespan.startup, run the block, then send lifespan.shutdown and wait for
    the app's answer: what a server does around the requests it serves."""
    lifespan = Lifespan()
    to_app, app_inbox = trio.open_memory_channel[Message](math.inf)
    answered = trio.Event()

    async def send(message: Message) -> None:
        lifespan.sent.append(message)
        answered.set()

    async def serve_lifespan() -> None:
        try:
            await app({"type": "lifespan", "state": {}}, app_inbox.receive, send)
        except Exception:
            if lifespan.sent and lifespan.sent[-1]["type"] == "lifespan.startup.failed":
                return  # a failed startup may raise after saying so, as Starlette's does
            raise

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_lifespan)
        await to_app.send({"type": "lifespan.startup"})
        await answered.wait()
        started = lifespan.sent[-1]["type"] == "lifespan.startup.complete"
        if started:
            yield lifespan
            answered = trio.Event()
            await to_app.send({"type": "lifespan.shutdown"})
            await answered.wait()
        nursery.cancel_scope.cancel()  # as Hypercorn does once it has the answer
    if not started:
        raise StartupFailed(lifespan.sent[-1])


@pytest.fixture
def lifespan() -> Callable[[ASGIApp], AbstractAsyncContextManager[Lifespan]]:
    return run_lifespan


def asgi_client(app: ASGIApp) -> httpx.AsyncClient:
    """An httpx client that calls ``app`` in-process (no lifespan: see run_lifespan)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@dataclass
class Server:
    """A Hypercorn trio server running in the test's nursery."""

    url: str
    shutdown: trio.Event
    stopped: trio.Event


@asynccontextmanager
async def run_hypercorn(app: ASGIApp, **config: Any) -> AsyncIterator[Server]:
    """Serve ``app`` with ``hypercorn.trio.serve`` on 127.0.0.1 (a free port). Leaving
    the block triggers a graceful shutdown (the ``shutdown_trigger``) and waits for it;
    set ``server.shutdown`` inside the block to start it earlier."""
    hypercorn_config = Config()
    hypercorn_config.bind = ["127.0.0.1:0"]
    hypercorn_config.accesslog = None
    for name, value in config.items():
        setattr(hypercorn_config, name, value)
    shutdown = trio.Event()
    stopped = trio.Event()

    async def serve_until_shutdown(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(
                app,  # type: ignore[arg-type]  # hypercorn's Framework union is narrower
                hypercorn_config,
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve_until_shutdown)
        server = Server(url=binds[0], shutdown=shutdown, stopped=stopped)
        try:
            yield server
        finally:
            shutdown.set()
            await stopped.wait()


@pytest.fixture
def hypercorn() -> Callable[..., AbstractAsyncContextManager[Server]]:
    return run_hypercorn


@asynccontextmanager
async def served(app: Any, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` served by a real Hypercorn (see run_hypercorn), and a client for it."""
    async with (
        run_hypercorn(app, **config) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        yield client


class Output:
    """Everything a process (or a process group) writes to one pipe, as it arrives."""

    def __init__(self) -> None:
        self.text = ""
        self.ended = False
        self._changed = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while data := await stream.receive_some():
                self.text += data.decode(errors="replace")
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self.ended = True
            self._changed.set()

    async def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``pattern`` appears ``count`` times (the caller bounds the wait)."""
        while len(found := list(re.finditer(pattern, self.text, re.MULTILINE))) < count:
            if self.ended:
                raise AssertionError(f"no {count} x {pattern!r} in the output:\n{self.text}")
            await self._changed.wait()
        return found


async def task_with_a_cleanup_bug() -> None:
    """At shutdown its nursery ends in [Cancelled, ValueError]: it fails while cancelled."""

    async def cleanup_fails() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("cleanup failed")

    async with trio.open_nursery() as inner:
        inner.start_soon(trio.sleep_forever)
        inner.start_soon(cleanup_fails)


class Recorder:
    """Names of the tasks that ran; ``wait_for(n)`` returns once ``n`` of them did.

    ``note`` is for trio's thread only (a thread task goes through
    ``trio.from_thread.run_sync``); ``record`` is the same as an ``async def`` task.
    """

    def __init__(self) -> None:
        self.ran: list[str] = []
        self._changed = trio.Event()

    def note(self, name: str) -> None:
        self.ran.append(name)
        self._changed.set()

    async def record(self, name: str) -> None:
        self.note(name)

    async def wait_for(self, count: int) -> None:
        while len(self.ran) < count:
            self._changed = trio.Event()
            await self._changed.wait()
