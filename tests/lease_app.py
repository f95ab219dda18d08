"""The app the lease tests serve (``python -m trio_bg serve lease_app:app``).

``GET /?key=K`` adds one durable task, ``once(K)``: it notes ``started K PID`` in the
ledger file ``$TRIO_BG_TEST_LEDGER``, waits until the file ``$TRIO_BG_TEST_GO`` exists,
then, its side effect, notes ``done K PID``; or ``refused K PID`` when `lease_held`
says its process no longer holds the task's row. The response's body is the serving
process's pid.
"""

from __future__ import annotations

import os

import trio
from journal_app import note_in_ledger

import trio_bg
from trio_bg._web.middleware import Receive, Scope, Send


@trio_bg.task(name="tests.lease_app.once", durable=True)
async def once(key: str) -> None:
    note_in_ledger(f"started {key} {os.getpid()}")
    go = trio.Path(os.environ["TRIO_BG_TEST_GO"])
    while not await go.exists():  # noqa: ASYNC110  (the test makes it: no event crosses processes)
        await trio.sleep(0.02)
    # A cancellation that came while exists() ran in its thread is delivered here, at a
    # checkpoint, before the side effect (as a task that awaits anything would).
    await trio.lowlevel.checkpoint()
    note_in_ledger(f"{'done' if trio_bg.lease_held() else 'refused'} {key} {os.getpid()}")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    key = scope["query_string"].decode().removeprefix("key=")
    trio_bg.current_tasks().add_task(once, key)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
