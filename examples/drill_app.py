"""A raw ASGI app made for shutdown drills: every request leaves background work behind.

Drill it from the repository root::

    python -m trio_bg drill examples.drill_app:app

Each request adds a mix of tasks: async sleeps of varying length, blocking calls run in
worker threads, a webhook that fails on purpose now and then, a cache refresh with a
``@trio_bg.task`` timeout it sometimes overruns, and, rarely, work far longer than any
grace period (cancelled at shutdown, or abandoned in its thread). The response carries
``x-trio-bg-tasks: N``, the number of tasks the request added: the drill's convention
for checking that every answered request had its tasks accepted.

With a journal (``--journal PATH``, which makes the drill set ``$TRIO_BG_DRILL_LEDGER``)
each request also adds two *durable* tasks, a receipt e-mail and an order archive: they
are stored in the journal before the response completes and survive a crash. Each
notes its run in the ledger file, and the response names them in
``x-trio-bg-durable``: the crash drill's books (``drill ... --journal PATH --kill``).
With ``--poison`` too, the crash drill asks ``GET /trio-bg-drill/poison`` mid-load: that
request adds a durable task that SIGKILLs its process, and names it in
``x-trio-bg-poison``; the next life must make it a dead letter, not run it again.

With Redis (``--redis [URL]``, the distributed drill, which sets ``$TRIO_BG_DRILL_REDIS``
and the ledger) the module defines ``worker``, a streaq worker (``idle_timeout`` from
``$TRIO_BG_DRILL_IDLE_TIMEOUT``, else trio_bg's default), with two remote tasks, a
thumbnail render and a search-index update; each request hands both to Redis instead
of adding the durable ones, and names them in ``x-trio-bg-remote``. Each run notes
``KEY started PID`` and ``KEY ran PID`` in the ledger (``python -m trio_bg worker
examples.drill_app:worker`` runs them)::

    python -m trio_bg drill examples.drill_app:app --redis --workers 2 --kill-worker

Without ``$TRIO_BG_DRILL_REDIS`` the module needs no streaq.

The app is not wrapped in the middleware: ``python -m trio_bg serve`` (and the drill)
wrap it, with the options given on the command line.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

import trio_bg

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TASKS_HEADER = b"x-trio-bg-tasks"
DURABLE_HEADER = b"x-trio-bg-durable"
POISON_PATH = "/trio-bg-drill/poison"
POISON_HEADER = b"x-trio-bg-poison"
REMOTE_HEADER = b"x-trio-bg-remote"
LEDGER = os.environ.get("TRIO_BG_DRILL_LEDGER")  # set by the drill, with a journal or Redis
REDIS = os.environ.get("TRIO_BG_DRILL_REDIS")  # set by the distributed drill


def note_run(key: str) -> None:
    """Append ``key`` to the drill's ledger: one line per run, whole, across processes."""
    if LEDGER is not None:
        descriptor = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, f"{key}\n".encode())
        finally:
            os.close(descriptor)


@trio_bg.task(name="drill.send_receipt", durable=True, retries=2)
async def send_receipt(key: str, seconds: float) -> None:
    """Durable: the receipt for an order must go out, crash or not."""
    await trio.sleep(seconds)
    note_run(key)


@trio_bg.task(name="drill.poison", durable=True, crash_limit=1)
async def poison() -> None:
    """Durable, and deadly: it kills its process, as an OOM kill or a segfault would.
    Its process's death makes it a dead letter at once (``crash_limit=1``): by default
    it would take two more lives along, and the tasks running in them."""
    os.kill(os.getpid(), signal.SIGKILL)


@trio_bg.task(name="drill.archive_order", durable=True)
def archive_order(key: str, seconds: float) -> None:
    """Durable, and blocking: runs in a worker thread."""
    time.sleep(seconds)
    note_run(key)


if REDIS is not None:
    import trio_bg.streaq

    worker = trio_bg.streaq.worker(
        REDIS,
        idle_timeout=float(
            os.environ.get("TRIO_BG_DRILL_IDLE_TIMEOUT", trio_bg.streaq.DEFAULT_IDLE_TIMEOUT)
        ),
    )

    @worker.task(name="drill.render_thumbnail")
    async def render_thumbnail(key: str, seconds: float) -> None:
        """Remote: runs on a streaq worker, at least once."""
        note_run(f"{key} started {os.getpid()}")
        await trio.sleep(seconds)
        note_run(f"{key} ran {os.getpid()}")

    @worker.task(name="drill.update_search_index")
    async def update_search_index(key: str, seconds: float) -> None:
        """Remote, and quick."""
        note_run(f"{key} started {os.getpid()}")
        await trio.sleep(seconds)
        note_run(f"{key} ran {os.getpid()}")


async def send_notification(seconds: float) -> None:
    """Talking to a slow mail or push service."""
    await trio.sleep(seconds)


def write_audit_record(seconds: float) -> None:
    """A blocking client library: runs in a worker thread."""
    time.sleep(seconds)


async def call_flaky_webhook() -> None:
    """Fails on purpose: the drill counts it as failed, the server lives on."""
    await trio.sleep(0.01)
    raise RuntimeError("the webhook answered 502 (on purpose, for the drill)")


@trio_bg.task(timeout=0.5)
async def refresh_cache(seconds: float) -> None:
    """Gets 0.5 s; asked for more, it is counted as timed out."""
    await trio.sleep(seconds)


async def rebuild_search_index() -> None:
    """Longer than any grace period: cancelled at shutdown, and named in the report."""
    await trio.sleep(600)


def export_archive() -> None:
    """Blocking and long: abandoned in its thread at shutdown (a thread cannot be
    cancelled), and named in the report."""
    time.sleep(600)


class DrillApp:
    """The ASGI app. Its choices are random but seeded, so two drills match."""

    def __init__(self, seed: int = 4) -> None:
        self._random = random.Random(seed)
        self._requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise NotImplementedError(f"the drill app serves no {scope['type']} connections")
        tasks = trio_bg.current_tasks()
        if scope["path"] == POISON_PATH and LEDGER is not None:
            tasks.add_task(poison)
            headers = [(POISON_HEADER, b"drill.poison")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"poisoned\n"})
            return
        added = self._add_tasks(tasks)
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if REDIS is not None:
            remote = self._add_remote_tasks(tasks)
            added += len(remote)
            headers.append((REMOTE_HEADER, " ".join(remote).encode()))
        elif LEDGER is not None:
            durable = self._add_durable_tasks(tasks)
            added += len(durable)
            headers.append((DURABLE_HEADER, " ".join(durable).encode()))
        headers.append((TASKS_HEADER, str(added).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": f"{added} tasks\n".encode()})

    def _add_tasks(self, tasks: trio_bg.BackgroundTasks) -> int:
        """Add this request's tasks; return how many."""
        self._requests += 1
        number, uniform = self._requests, self._random.uniform
        tasks.add_task(send_notification, uniform(0.05, 1.5))
        tasks.add_task(write_audit_record, uniform(0.01, 0.2))
        added = 2
        if number % 4 == 0:
            tasks.add_task(refresh_cache, uniform(0.1, 1.0))
            added += 1
        if number % 10 == 3:
            tasks.add_task(call_flaky_webhook)
            added += 1
        if number % 50 == 7:
            tasks.add_task(rebuild_search_index)
            added += 1
        if number % 50 == 17:
            tasks.add_task(export_archive)
            added += 1
        return added

    def _add_durable_tasks(self, tasks: trio_bg.BackgroundTasks) -> list[str]:
        """Add this request's durable tasks; return their keys."""
        order = uuid.uuid4().hex[:12]  # unique across the server's lives
        receipt, archive = f"{order}-receipt", f"{order}-archive"
        tasks.add_task(send_receipt, receipt, self._random.uniform(0.05, 1.0))
        tasks.add_task(archive_order, archive, self._random.uniform(0.01, 0.2))
        return [receipt, archive]

    def _add_remote_tasks(self, tasks: trio_bg.BackgroundTasks) -> list[str]:
        """Hand this request's remote tasks to Redis; return their keys."""
        image = uuid.uuid4().hex[:12]
        thumbnail, index = f"{image}-thumbnail", f"{image}-index"
        tasks.add_task(render_thumbnail, thumbnail, self._random.uniform(0.05, 0.4))
        tasks.add_task(update_search_index, index, self._random.uniform(0.01, 0.1))
        return [thumbnail, index]


async def _answer_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


app = DrillApp()
