"""The streaq worker the remote-task process tests run (``python -m trio_bg worker
streaq_app:tasks``) and enqueue to, on the Redis at ``$TRIO_BG_TEST_REDIS``.

Each task appends a line to the ledger file ``$TRIO_BG_TEST_LEDGER``: ``KEY PID``,
or ``KEY started PID`` and ``KEY done PID`` (``too_slow`` only starts: it times out).
With ``$TRIO_BG_TEST_HOLD`` set, a `slow` task never ends in that process; with
``$TRIO_BG_TEST_NEWER`` set, the worker knows a task more, as a newer deployment would.

``app`` is the web side (``python -m trio_bg serve streaq_app:app``): ``GET /?key=K``
hands ``record(K)`` to the worker's queue; with ``$TRIO_BG_TEST_JOURNAL`` set, through
that journal.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any

import streaq
import trio

import trio_bg
import trio_bg.streaq

tasks = trio_bg.streaq.worker(
    os.environ["TRIO_BG_TEST_REDIS"],
    idle_timeout=float(os.environ.get("TRIO_BG_TEST_IDLE_TIMEOUT", "2")),
    grace_period=int(os.environ.get("TRIO_BG_TEST_GRACE_PERIOD", "10")),
)


@tasks.task(name="tests.streaq_app.record")
async def record(key: str) -> None:
    note_in_ledger(f"{key} {os.getpid()}")


@tasks.task(name="tests.streaq_app.slow")
async def slow(key: str, seconds: float) -> None:
    note_in_ledger(f"{key} started {os.getpid()}")
    await trio.sleep(math.inf if os.environ.get("TRIO_BG_TEST_HOLD") else seconds)
    note_in_ledger(f"{key} done {os.getpid()}")


@tasks.task(name="tests.streaq_app.too_slow", timeout=timedelta(milliseconds=200))
async def too_slow(key: str) -> None:
    note_in_ledger(f"{key} started {os.getpid()}")
    async with trio.open_nursery() as nursery:  # (cancelled, it raises a group)
        nursery.start_soon(trio.sleep_forever)


if os.environ.get("TRIO_BG_TEST_NEWER"):

    @tasks.task(name="tests.streaq_app.added_later")
    async def added_later(key: str) -> None:
        note_in_ledger(f"{key} {os.getpid()}")


def note_in_ledger(line: str) -> None:
    """Append ``line`` to the ledger: one write with O_APPEND, so lines stay whole
    across processes."""
    descriptor = os.open(os.environ["TRIO_BG_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, f"{line}\n".encode())
    finally:
        os.close(descriptor)


pickling_tasks = streaq.Worker(os.environ["TRIO_BG_TEST_REDIS"])
"""A worker of streaq's defaults, which pickles: ``python -m trio_bg worker`` refuses it."""


async def _web(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    query = dict(pair.split("=", 1) for pair in scope["query_string"].decode().split("&") if pair)
    trio_bg.current_tasks().add_task(record, query["key"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"OK"})


app = trio_bg.BackgroundTaskMiddleware(
    _web,  # type: ignore[arg-type]
    streaq=tasks,
    journal=os.environ.get("TRIO_BG_TEST_JOURNAL") or None,
    grace_period=5,
)
