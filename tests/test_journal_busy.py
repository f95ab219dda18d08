"""A journal locked by another process: a store fails within the busy timeout, however
much work is queued behind the lock (issue 18, item 6). The lock is held by a real
second process, on a real file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from conftest import asgi_client, run_lifespan
from processes import BOUND

import trio_bg
from trio_bg._keeping import journal as _journal

BUSY = 0.5
"""The busy timeout in these tests (5 s in production)."""

MARGIN = 1.0
"""What a failing store may take beyond the busy timeout (generous: a noisy machine).
Before the fix, a store waited once per piece of work queued ahead of it."""

QUEUED = 10
"""Pieces of work queued behind the lock (dead letters to record), ahead of the stores."""

_HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes the pipe
"""

gate = trio.Event()
running = 0
all_running = trio.Event()


@pytest.fixture(autouse=True)
def fresh_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    global gate, running, all_running
    gate, running, all_running = trio.Event(), 0, trio.Event()
    monkeypatch.setattr(_journal, "BUSY_TIMEOUT", BUSY)
    yield


@trio_bg.task(name="tests.journal_busy.fails", durable=True)
async def fails(number: int) -> None:
    global running
    running += 1
    if running == QUEUED:
        all_running.set()
    await gate.wait()
    raise RuntimeError("a dead letter to record")


@trio_bg.task(name="tests.journal_busy.welcome", durable=True)
async def welcome(number: int) -> None:
    pass


async def endpoint(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    trio_bg.current_tasks().add_task(welcome, 1)
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"OK"})  # type: ignore[operator]


@asynccontextmanager
async def locked(path: Path) -> AsyncIterator[None]:
    """Another process holds the journal's write lock (``BEGIN EXCLUSIVE``) in the block."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        said = b""
        with trio.fail_after(BOUND):
            while not said.endswith(b"\n"):
                said += await process.stdout.receive_some()
        assert said == b"locked\n"
        yield
    finally:
        assert process.stdin is not None
        await process.stdin.aclose()
        with trio.fail_after(BOUND):
            await process.wait()


async def queue_dead_letters(nursery: trio_bg.BackgroundNursery) -> None:
    """Make ``QUEUED`` durable tasks fail: their dead letters wait behind the lock."""
    gate.set()
    with trio.fail_after(BOUND):
        await nursery.wait_idle()


async def test_a_store_from_start_soon_fails_within_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        for number in range(QUEUED):
            bg.start_soon(fails, number)
        with trio.fail_after(BOUND):
            await all_running.wait()
        async with locked(path):
            await queue_dead_letters(bg)
            started = trio.current_time()
            for number in range(100):
                bg.start_soon(welcome, number)
            with trio.fail_after(BOUND):
                while bg.stats.discarded < 100:  # noqa: ASYNC110  (no event says so)
                    await trio.sleep(0.01)
            took = trio.current_time() - started
    assert took < BUSY + MARGIN


async def test_a_request_gets_its_503_within_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    app = trio_bg.BackgroundTaskMiddleware(endpoint, journal=path, grace_period=0)
    answers: list[tuple[int, float]] = []

    async def request(client: object) -> None:
        started = trio.current_time()
        response = await client.get("/")  # type: ignore[attr-defined]
        answers.append((response.status_code, trio.current_time() - started))

    async with run_lifespan(app), asgi_client(app) as client:
        for number in range(QUEUED):
            app.nursery.start_soon(fails, number)
        with trio.fail_after(BOUND):
            await all_running.wait()
        async with locked(path):
            await queue_dead_letters(app.nursery)
            with trio.fail_after(BOUND):
                async with trio.open_nursery() as nursery:
                    for _ in range(10):
                        nursery.start_soon(request, client)
    assert [status for status, _ in answers] == [503] * 10
    assert max(took for _, took in answers) < BUSY + MARGIN
