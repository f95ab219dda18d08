"""A raw ASGI app: bare, with a raw trio nursery, or wrapped in trio_bg's middleware."""

from __future__ import annotations

from typing import Literal, Unpack

import trio

import trio_bg

from .counting import BODY, COUNT_PATH, COUNTS, HEADERS, TASKS, ASGIApp, Receive, Scope, Send

Mode = Literal["bare", "nursery", "trio_bg"]


async def _respond(send: Send, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build(task: str, *, mode: Mode, **options: Unpack[trio_bg.NurseryOptions]) -> ASGIApp:
    """The raw app. Each request adds ``TASKS[task]`` (unless ``task`` is "none"):

    - "bare": no tasks at all;
    - "nursery": ``nursery.start_soon`` on a trio nursery the lifespan owns, after the
      response: the floor for any design that starts one trio task per request;
    - "trio_bg": ``trio_bg.current_tasks().add_task``, the app wrapped in the middleware,
      which gets ``options`` (the journal's, say).
    """
    func = TASKS.get(task)
    if func is not None and mode == "bare":
        raise ValueError("the bare app adds no tasks: use task 'none'")
    if options and mode != "trio_bg":
        raise ValueError(f"options are the middleware's: the {mode} app takes none")
    nurseries: list[trio.Nursery] = []

    async def lifespan(receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with trio.open_nursery() as nursery:
            nurseries.append(nursery)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            nursery.cancel_scope.cancel()
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
            if func is not None and mode == "nursery":
                nurseries[0].start_soon(func)

    if mode != "trio_bg":
        return app
    return COUNTS.watched(trio_bg.BackgroundTaskMiddleware(app, **options))
