"""The app the poisoned-journal process tests serve (``python -m trio_bg serve
poison_app:app``).

``GET /?key=K`` adds a durable task that appends ``K PID`` to the ledger file
``$TRIO_BG_TEST_LEDGER``. ``GET /kill_with_retries`` and ``GET /kill`` add a durable
task that notes its name in the ledger, then SIGKILLs its process: the first with
``retries=2`` (a trio task), the second without retries (a thread task).
"""

from __future__ import annotations

import os
import signal

from journal_app import note_in_ledger

import trio_bg
from trio_bg._web.middleware import Receive, Scope, Send


@trio_bg.task(name="tests.poison_app.record", durable=True)
async def record(key: str) -> None:
    note_in_ledger(f"{key} {os.getpid()}")


@trio_bg.task(name="tests.poison_app.kill_with_retries", durable=True, retries=2)
async def kill_with_retries() -> None:
    note_in_ledger(f"kill_with_retries {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


@trio_bg.task(name="tests.poison_app.kill", durable=True)
def kill() -> None:
    note_in_ledger(f"kill {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    tasks = trio_bg.current_tasks()
    if scope["path"] == "/kill_with_retries":
        tasks.add_task(kill_with_retries)
    elif scope["path"] == "/kill":
        tasks.add_task(kill)
    else:
        tasks.add_task(record, scope["query_string"].decode().removeprefix("key="))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
