"""A raw ASGI app: bare, with a raw trio nursery, or wrapped in trio_bg's middleware."""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any, Literal, Unpack

import trio

import trio_bg

from .counting import BODY, COUNT_PATH, COUNTS, HEADERS, TASKS, ASGIApp, Receive, Scope, Send

Mode = Literal["bare", "nursery", "threads", "trio_bg"]

THREADS = 40
"""Worker threads of the "threads" app: trio_bg's default ``thread_limit``."""
STOP_TIMEOUT = 5.0
"""Seconds the "threads" app waits at shutdown for each of its threads to end."""


async def _respond(send: Send, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build(task: str, *, mode: Mode, **options: Unpack[trio_bg.NurseryOptions]) -> ASGIApp:
    """The raw app. Each request adds ``TASKS[task]`` (unless ``task`` is "none"):

    - "bare": no tasks at all;
    - "nursery": ``nursery.start_soon`` on a trio nursery the lifespan owns, after the
      response: the floor for any design that starts one trio task per request (a plain
      function goes through ``trio.to_thread.run_sync``, trio's default limiter);
    - "threads": a plain function put on a `queue.SimpleQueue` after the response, that
      `THREADS` plain threads (started with the lifespan) take calls from; trio never
      hears back: the floor for running a plain function in a thread of this process;
    - "trio_bg": ``trio_bg.current_tasks().add_task``, the app wrapped in the middleware,
      which gets ``options`` (the journal's, say).
    """
    func = TASKS.get(task)
    is_async = inspect.iscoroutinefunction(func)
    if func is not None and mode == "bare":
        raise ValueError("the bare app adds no tasks: use task 'none'")
    if options and mode != "trio_bg":
        raise ValueError(f"options are the middleware's: the {mode} app takes none")
    if mode == "threads" and (func is None or is_async):
        raise ValueError("the threads app runs a plain function: use task 'block'")
    nurseries: list[trio.Nursery] = []
    calls: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (call := calls.get()) is not None:
            call()

    async def lifespan(receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
        if mode == "threads":
            for thread in threads:
                thread.start()
        async with trio.open_nursery() as nursery:
            nurseries.append(nursery)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            nursery.cancel_scope.cancel()
        if mode == "threads":
            for _ in threads:
                calls.put(None)
            for thread in threads:
                await trio.to_thread.run_sync(thread.join, STOP_TIMEOUT)
        await send({"type": "lifespan.shutdown.complete"})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] != "http":
            raise RuntimeError(f"unsupported scope {scope['type']}")
        elif scope["path"] == COUNT_PATH:
            body = COUNTS.as_json()
            await _respond(send, body, [(b"content-length", str(len(body)).encode())])
        else:
            if func is not None and mode == "trio_bg":
                trio_bg.current_tasks().add_task(func)
            COUNTS.request(with_task=func is not None)
            await _respond(send, BODY, HEADERS)
            if func is not None and mode == "threads":
                calls.put(func)
            elif func is not None and mode == "nursery":
                if is_async:
                    nurseries[0].start_soon(func)
                else:
                    nurseries[0].start_soon(trio.to_thread.run_sync, func)

    if mode != "trio_bg":
        return app
    return COUNTS.watched(trio_bg.BackgroundTaskMiddleware(app, **options))
