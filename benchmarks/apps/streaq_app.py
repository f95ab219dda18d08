"""The remote-task app of benchmark 8, and the streaq worker it hands its tasks to.

Hypercorn loads ``benchmarks.apps.streaq_app:build('remote', streaq=True)``; the worker
processes run ``python -m trio_bg worker benchmarks.apps.streaq_app:tasks``. Both use the
Redis at ``$TRIO_BG_BENCH_REDIS``. The app is the raw app of benchmark 1 wrapped in the
middleware; ``GET /count`` reports, as ``completed``, the tasks that completed here plus
the remote tasks Redis acknowledged (``handed_off``): those are done, as far as the web
process goes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from streaq import Worker

import trio_bg
import trio_bg.streaq

from .counting import (
    BODY,
    COUNT_PATH,
    COUNTS,
    HEADERS,
    WELCOME_ARGUMENTS,
    ASGIApp,
    Receive,
    Scope,
    Send,
)

REDIS_ENV = "TRIO_BG_BENCH_REDIS"
NAME = "benchmarks.streaq.welcome"
DONE_KEY = "benchmarks:streaq:done"
"""The Redis counter each run of the remote task increments."""
ARGUMENTS = WELCOME_ARGUMENTS
"""A typical task's arguments, as in benchmark 6."""


def make_worker(redis_url: str) -> Worker[Any]:
    """A trio_bg streaq worker knowing one task, `NAME`: it increments `DONE_KEY`."""
    worker = trio_bg.streaq.worker(redis_url)

    @worker.task(name=NAME)
    async def welcome(user_id: int, email: str, template: str, locale: str, plan: str) -> None:
        await worker.redis.incr(DONE_KEY)

    return worker


tasks = make_worker(os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379"))


async def welcome_here(user_id: int, email: str, template: str, locale: str, plan: str) -> None:
    """The in-memory no-op task, with the same arguments."""
    COUNTS.task_done()


def build(task: str, *, streaq: bool) -> ASGIApp:
    """Each request adds one task with `ARGUMENTS`: "remote" (`NAME`, handed to Redis),
    or "noop" (`welcome_here`, in memory); with ``streaq`` the middleware has the worker
    (required for "remote")."""
    if task not in ("remote", "noop") or (task == "remote" and not streaq):
        raise ValueError(f"task 'remote' (with streaq=True) or 'noop', not {task!r}")
    func: Callable[..., Any] = tasks.registry[NAME] if task == "remote" else welcome_here
    middleware: trio_bg.BackgroundTaskMiddleware

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] != "http":
            raise RuntimeError(f"unsupported scope {scope['type']}")
        elif scope["path"] == COUNT_PATH:
            counts = json.loads(COUNTS.as_json())
            handed_off = middleware.nursery.stats.handed_off
            counts |= {"completed": counts["completed"] + handed_off, "handed_off": handed_off}
            body = json.dumps(counts).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
        else:
            trio_bg.current_tasks().add_task(func, **ARGUMENTS)
            COUNTS.request(with_task=True)
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": BODY})

    options: dict[str, Any] = {"streaq": tasks} if streaq else {}
    middleware = COUNTS.watched(trio_bg.BackgroundTaskMiddleware(app, **options))
    return middleware
