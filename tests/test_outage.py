"""Outages: a Redis that stalls, that forgets its data or does not persist it, and a
nursery asked to wait while its tasks are still being stored. Nothing is lost or
miscounted without a word."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest
import trio
from conftest import asgi_client, run_lifespan
from redis_server import RedisServer, redis_server_or_skip
from test_streaq import HandedOff, Queue, endpoint, looking_into, run_worker_until_empty

import trio_bg
from trio_bg._keeping import handoff as _handoff
from trio_bg._running.nursery import remote_keeper
from trio_bg._web.middleware import HANDOFF_IN_DOUBT_TEXT

stored: list[int] = []


@trio_bg.task(name="tests.outage.note", durable=True)
async def note(number: int) -> None:
    stored.append(number)


async def test_wait_idle_waits_for_a_task_still_being_stored(tmp_path: Path) -> None:
    stored.clear()
    async with trio_bg.open_background_nursery(journal=tmp_path / "tasks.db") as nursery:
        nursery.start_soon(note, 1)  # stored in the journal first, then run
        assert nursery.stats.reserved == 1
        await nursery.wait_idle()
        assert (nursery.stats.completed, stored) == (1, [1])


# -- a Redis that stalls -------------------------------------------------------------


async def test_a_hand_off_redis_never_answered_is_unconfirmed_not_discarded(
    queue: Queue, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_handoff, "SEND_TIMEOUT", 0.3)
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "s@example.com")),
        streaq=queue.worker,
    )
    assert redis_server.process is not None
    async with run_lifespan(app), asgi_client(app) as client:
        os.kill(redis_server.process.pid, signal.SIGSTOP)  # a stall, as DEBUG SLEEP makes
        try:
            response = await client.get("/")
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        assert response.status_code == 503
        assert response.text == HANDOFF_IN_DOUBT_TEXT
        stats = app.nursery.stats
        assert (stats.unconfirmed, stats.discarded, stats.handed_off) == (1, 0, 0)
    assert app.report.unconfirmed == 1
    assert "1 unconfirmed by Redis (may run)" in str(app.report)
    # Redis woke up with the batch it had been sent: a worker runs the task after all.
    await run_worker_until_empty(queue)
    assert queue.done == ["s@example.com you"]


# -- a Redis that forgets --------------------------------------------------------------


def rows(path: Path) -> list[tuple[str, str | None]]:
    """The journal's rows: name, and where Redis put it (None: not handed off yet)."""
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("SELECT name, sent FROM tasks ORDER BY id").fetchall()


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds (the guard looks at Redis every second)."""
    with trio.fail_after(10):
        # The journal's thread and Redis have no event to wait on.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


@pytest.fixture
async def queue(redis_server: RedisServer) -> AsyncIterator[Queue]:
    async with looking_into(redis_server.url) as queue:
        yield queue


@pytest.fixture
async def durable_queue(durable_redis_server: RedisServer) -> AsyncIterator[Queue]:
    async with looking_into(durable_redis_server.url) as queue:
        yield queue


@pytest.fixture
async def forgetful(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, Queue]]:
    """A Redis that keeps nothing across a restart, and a queue on it."""
    directory = tmp_path / "forgetful"
    directory.mkdir()
    for server in redis_server_or_skip(directory):
        async with looking_into(server.url) as queue:
            yield server, queue


async def test_with_a_journal_what_redis_forgets_is_handed_off_again(
    forgetful: tuple[RedisServer, Queue], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, queue = forgetful
    path = tmp_path / "tasks.db"
    handed_off = HandedOff()
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "f@example.com")),
        streaq=queue.worker,
        journal=path,
        on_event=handed_off,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/")).status_code == 200
        await handed_off.wait_for(1)
        # Redis acknowledged it; no worker has taken it: its row stays, with its receipt
        # (recorded in the journal's next commit).
        await until(lambda: rows(path)[0][1] is not None)
        [(name, sent)] = rows(path)
        assert name == "streaq:tests.welcome"
        server.kill()
        server.start()  # empty: no persistence
        await handed_off.wait_for(2)  # the guard noticed and handed it off again
        assert app.nursery.stats.resent == 1
        await until(lambda: rows(path)[0][1] not in (None, sent))  # (the new marker's)
        async with looking_into(server.url) as fresh:
            assert len(await fresh.stored()) == 1
            await run_worker_until_empty(fresh)
            assert fresh.done == ["f@example.com you"]
        await until(lambda: rows(path) == [])  # a worker took it: the row goes
    assert app.report.resent == 1
    assert "handed off again from the journal" in caplog.text


async def test_without_a_journal_what_redis_forgets_is_reported(
    forgetful: tuple[RedisServer, Queue], caplog: pytest.LogCaptureFixture
) -> None:
    server, queue = forgetful
    handed_off = HandedOff()
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "g@example.com")),
        streaq=queue.worker,
        on_event=handed_off,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        for _ in range(3):
            assert (await client.get("/")).status_code == 200
        await handed_off.wait_for(3)
        server.kill()
        server.start()
        await until(lambda: app.nursery.stats.maybe_lost == 3)
    report = app.report
    assert (report.handed_off, report.maybe_lost) == (3, 3)
    assert not report.all_completed
    assert "3 perhaps lost by Redis" in str(report)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("3 remote task(s) it had acknowledged" in line for line in errors)


async def test_what_a_worker_took_is_not_reported_lost(
    forgetful: tuple[RedisServer, Queue],
) -> None:
    server, queue = forgetful
    handed_off = HandedOff()
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "h@example.com")),
        streaq=queue.worker,
        on_event=handed_off,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/")).status_code == 200
        await handed_off.wait_for(1)
        await run_worker_until_empty(queue)
        # A worker took it: unwatched.
        await until(lambda: not len(remote_keeper(app.nursery) or ()))
        server.kill()
        server.start()
        assert (await client.get("/")).status_code == 200
        await handed_off.wait_for(2)
    assert (app.report.maybe_lost, app.report.resent) == (0, 0)
    assert app.report.all_completed


# -- a Redis that does not persist --------------------------------------------------


async def test_a_redis_without_persistence_is_warned_about(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    app = trio_bg.BackgroundTaskMiddleware(endpoint(lambda tasks: None), streaq=queue.worker)
    async with run_lifespan(app):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("does not persist its data (appendonly no, save '')" in w for w in warnings)


async def test_a_persistent_redis_is_not_warned_about(
    durable_queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: None), streaq=durable_queue.worker
    )
    async with run_lifespan(app):
        pass
    assert "persist" not in caplog.text


async def test_a_redis_that_refuses_config_is_said_to_be_unchecked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for server in redis_server_or_skip(tmp_path, extra=("--rename-command", "CONFIG", "")):
        queue = Queue(server.url)
        app = trio_bg.BackgroundTaskMiddleware(endpoint(lambda tasks: None), streaq=queue.worker)
        async with run_lifespan(app):
            pass
    assert "could not check whether it persists its data" in caplog.text
