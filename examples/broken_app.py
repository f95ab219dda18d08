"""A deliberately broken app whose background work gets lost: the drill must fail on it.

    python -m trio_bg drill examples.broken_app:app      # exits 1, naming the lost tasks

Each request promises three tasks (``x-trio-bg-tasks: 3``) but hands only one to
trio_bg; the other two are fired and forgotten with ``trio.lowlevel.spawn_system_task``,
the way work escapes a server's books. Nothing waits for them at shutdown and nothing
reports them: they die with the process, and only the drill's bookkeeping notices.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

import trio_bg

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_receipt() -> None:
    await trio.sleep(0.05)


async def charge_card() -> None:
    await trio.sleep(0.2)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    trio_bg.current_tasks().add_task(send_receipt)
    # The bug: work the server never sees.
    trio.lowlevel.spawn_system_task(charge_card)
    trio.lowlevel.spawn_system_task(charge_card)
    headers = [(b"x-trio-bg-tasks", b"3")]  # what the drill is told: three tasks
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"paid\n"})
