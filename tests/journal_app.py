"""The app the journal's process tests serve (``python -m trio_bg serve journal_app:app``).

``GET /?key=K`` adds one durable task, ``record(K, holder)``: it appends the line
``K PID`` to the ledger file ``$TRIO_BG_TEST_LEDGER`` once it has run, after
``$TRIO_BG_TEST_TASK_SECONDS`` (default 0). With ``&hold=1`` the holder is this
process: in it the task never ends (a shutdown cuts it short, a SIGKILL kills it), in
any other process it runs at once. The response's body is the serving process's pid.
``GET /keyed?key=K`` adds the same, keyed (``key="keyed:{key}"``): its body is the
task's id. ``GET /wait?id=ID`` answers the status of task ``ID`` once it has ended (in
any process that shares the journal), as JSON.
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qs

import trio

import trio_bg
from trio_bg._web.middleware import Receive, Scope, Send


@trio_bg.task(name="tests.journal_app.record", durable=True)
async def record(key: str, holder: int) -> None:
    if holder == os.getpid():
        await trio.sleep_forever()
    await trio.sleep(float(os.environ.get("TRIO_BG_TEST_TASK_SECONDS", "0")))
    note_in_ledger(f"{key} {os.getpid()}")


@trio_bg.task(name="tests.journal_app.keyed", durable=True, key="keyed:{key}")
async def keyed(key: str, holder: int) -> None:
    await record(key, holder)


def note_in_ledger(line: str, *, variable: str = "TRIO_BG_TEST_LEDGER") -> None:
    """Append ``line`` to the ledger file named by ``$variable``: one write with
    O_APPEND, so lines stay whole across processes."""
    descriptor = os.open(os.environ[variable], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, f"{line}\n".encode())
    finally:
        os.close(descriptor)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    query = {key: values[0] for key, values in parse_qs(scope["query_string"].decode()).items()}
    if scope["path"] == "/wait":
        status = await trio_bg.wait_task(query["id"], timeout=20)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(status.as_dict()).encode()})
        return
    holder = os.getpid() if query.get("hold") else 0
    task = keyed if scope["path"] == "/keyed" else record
    handle = trio_bg.current_tasks().add_task(task, query["key"], holder)
    body = handle.id if task is keyed else str(os.getpid())
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})
