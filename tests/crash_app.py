"""An app that only pretends to keep its tasks: it names them in ``x-trio-bg-durable``,
as the crash drill asks, but adds them as ordinary in-memory tasks, which a SIGKILL
takes along. The crash drill must catch it."""

from __future__ import annotations

import uuid

import trio
from journal_app import note_in_ledger

import trio_bg
from trio_bg._web.middleware import Receive, Scope, Send


async def record(key: str) -> None:
    await trio.sleep(1.0)  # still running when the drill kills the server
    note_in_ledger(key, variable="TRIO_BG_DRILL_LEDGER")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    key = uuid.uuid4().hex
    trio_bg.current_tasks().add_task(record, key)
    headers = [(b"x-trio-bg-durable", key.encode()), (b"x-trio-bg-tasks", b"1")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"OK"})
