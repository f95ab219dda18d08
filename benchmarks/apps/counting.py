"""What every benchmark app shares: the response, the tasks, and their counts.

Each server process serves one app, so the counts are process-wide. ``added``
counts tasks handed to a background mechanism, ``completed`` the tasks that ran to
their end; after the load the harness waits for the two to match. Apps served
through trio_bg also report its own counts: ``accepted`` (handed to the nursery
once the response completed), ``discarded`` (the response never completed, e.g. the
client went away mid-request when the load ended: never run, but counted and logged)
and ``rejected`` (refused by a full nursery: never added). ``cpu_trio_us`` and
``cpu_process_us`` are the CPU time so far of the thread serving ``/count`` (trio's) and
of the whole process (with the journal's thread, worker threads), in microseconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

import trio_bg

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY = b"OK"
CONTENT_TYPE = "text/plain; charset=utf-8"
HEADERS = [(b"content-length", b"2"), (b"content-type", CONTENT_TYPE.encode())]
"""Exactly what Starlette sends for ``Response(b"OK", media_type="text/plain")``."""

WELCOME_ARGUMENTS: dict[str, Any] = {
    "user_id": 1234567,
    "email": "user1234567@example.com",
    "template": "welcome",
    "locale": "en-GB",
    "plan": "pro",
}
"""A typical task's arguments, a welcome e-mail to send (the journal's and the remote
tasks' benchmarks)."""

LOAD_PATH = "/"
COUNT_PATH = "/count"


class Counts:
    """Requests answered on `LOAD_PATH`, tasks added, tasks completed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # blocking tasks finish in worker threads
        self.answered = 0
        self.added = 0
        self.completed = 0
        self._middleware: trio_bg.BackgroundTaskMiddleware | None = None

    def watched(
        self, middleware: trio_bg.BackgroundTaskMiddleware
    ) -> trio_bg.BackgroundTaskMiddleware:
        """Report ``middleware``'s nursery counts too; return it."""
        self._middleware = middleware
        return middleware

    def request(self, *, with_task: bool) -> None:
        """One request on the load path was handled (and added a task, or not)."""
        self.answered += 1
        self.added += with_task

    def task_done(self) -> None:
        with self._lock:
            self.completed += 1

    def as_json(self) -> bytes:
        with self._lock:
            counts = {"answered": self.answered, "added": self.added, "completed": self.completed}
        counts["cpu_trio_us"] = int(time.thread_time() * 1e6)  # (called in trio's thread)
        counts["cpu_process_us"] = int(time.process_time() * 1e6)
        if self._middleware is not None:
            stats = self._middleware.nursery.stats
            counts |= {
                "accepted": stats.accepted,
                "discarded": stats.discarded,
                "rejected": stats.rejected,
            }
        return json.dumps(counts).encode()


COUNTS = Counts()


async def noop_task() -> None:
    """(a) a no-op async task."""
    COUNTS.task_done()


async def sleep_task() -> None:
    """(b) an async task that waits 50 ms."""
    await trio.sleep(0.05)
    COUNTS.task_done()


def block_task() -> None:
    """(c) a plain function that blocks its thread for 10 ms."""
    time.sleep(0.01)
    COUNTS.task_done()


@trio_bg.task(name="benchmarks.apps.durable_noop", durable=True)
async def durable_noop_task() -> None:
    """(d) a durable no-op async task: stored in the app's journal before the response
    completes, removed from it once it has run (registered under its name at import)."""
    COUNTS.task_done()


TASKS: dict[str, Callable[[], Any]] = {
    "noop": noop_task,
    "sleep": sleep_task,
    "block": block_task,
    "durable": durable_noop_task,
}
