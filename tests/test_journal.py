"""Durable tasks in one process: the journal file, its checks, and a task's life in it."""

from __future__ import annotations

import functools
import logging
import math
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import fastapi
import pytest
import trio
from conftest import StartupFailed, asgi_client, run_lifespan, served

import trio_bg
from trio_bg import fastapi as trio_bg_fastapi
from trio_bg._errors import JournalError
from trio_bg._keeping import journal as _journal
from trio_bg._keeping import journal_file as _journal_file
from trio_bg._keeping import journal_schema as _journal_schema
from trio_bg._web.middleware import ASGIApp
from trio_bg.testing import open_test_client

ran: list[tuple[str, int]] = []
changed = trio.Event()
gate = trio.Event()  # what the "blocked" tasks wait for


@pytest.fixture(autouse=True)
def fresh_records() -> Iterator[None]:
    global changed, gate
    ran.clear()
    changed, gate = trio.Event(), trio.Event()
    yield


async def ran_count(count: int) -> None:
    global changed
    while len(ran) < count:
        changed = trio.Event()
        await changed.wait()


def note(name: str, number: int) -> None:
    ran.append((name, number))
    changed.set()


@trio_bg.task(name="tests.journal.welcome", durable=True)
async def welcome(number: int, *, to: str = "someone@example.com") -> None:
    note("welcome", number)


@trio_bg.task(name="tests.journal.blocked", durable=True)
async def blocked(number: int) -> None:
    await gate.wait()
    note("blocked", number)


@trio_bg.task(name="tests.journal.in_thread", durable=True)
def in_thread(number: int) -> None:
    trio.from_thread.run_sync(note, "in_thread", number)


@trio_bg.task(
    name="tests.journal.flaky", durable=True, retries=2, backoff=trio_bg.Backoff(0, 1, 0, 0)
)
async def flaky(number: int) -> None:
    note("flaky", number)
    raise RuntimeError("it always fails")


def journal_rows(path: Path) -> list[_journal_file.Row]:
    connection = sqlite3.connect(path)
    try:
        return _journal_file.rows(connection)
    finally:
        connection.close()


# -- declaring and adding durable tasks ----------------------------------------------


def test_a_durable_task_needs_a_name() -> None:
    with pytest.raises(TypeError, match="needs a stable name"):
        trio_bg.task(durable=True)


def test_two_durable_tasks_cannot_share_a_name() -> None:
    async def other(number: int) -> None: ...

    with pytest.raises(ValueError, match=r"two durable tasks are named 'tests\.journal\.welcome'"):
        trio_bg.task(name="tests.journal.welcome", durable=True)(other)


async def test_a_durable_task_without_a_journal_is_refused_at_add_time() -> None:
    async with trio_bg.open_background_nursery() as bg:
        with pytest.raises(RuntimeError, match="durable task, and this background nursery has no"):
            bg.start_soon(welcome, 1)
    assert bg.report.accepted == 0


def nested(depth: int) -> list[object]:
    """A list in a list... ``depth`` deep."""
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def holding_itself() -> list[object]:
    value: list[object] = []
    value.append(value)
    return value


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            (object(),),
            {},
            r"argument 1 of durable task tests\.journal\.welcome is not JSON \(it holds a object\)",
        ),
        ((1,), {"to": {"when": {1, 2}}}, r"argument 'to' .* is not JSON \(it holds a set\)"),
        ((math.nan,), {}, r"argument 1 .* NaN or infinite"),
        (
            (10**5000,),
            {},
            rf"argument 1 .* is not JSON \(an int of over {sys.get_int_max_str_digits()} digits\)",
        ),
        (
            (1,),
            {"to": nested(100_000)},
            r"argument 'to' .* is not JSON \(it is nested too deeply\)",
        ),
        ((holding_itself(),), {}, r"argument 1 .* is not JSON \(a list that holds itself\)"),
        ((1,), {"to": ("a", "b")}, r"argument 'to' .* come back from JSON as a list, not a tuple"),
        ((1,), {"to": {1: "a"}}, r"argument 'to' .* would come back from JSON as something else"),
    ],
)
async def test_arguments_must_be_json_and_come_back_the_same(
    tmp_path: Path, args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    async with trio_bg.open_background_nursery(journal=tmp_path / "tasks.db") as bg:
        with pytest.raises(TypeError, match=message):
            bg.start_soon(welcome, *args, **kwargs)  # type: ignore[arg-type]
    assert bg.report.accepted == 0
    assert journal_rows(tmp_path / "tasks.db") == []


def test_a_partial_of_a_durable_task_is_refused() -> None:
    with pytest.raises(TypeError, match=r"durable task tests\.journal\.welcome itself"):
        trio_bg.BackgroundTasks().add_task(functools.partial(welcome, 1))


# -- a durable task's life -----------------------------------------------------------


async def test_a_completed_task_leaves_no_row(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        bg.start_soon(welcome, 1, to="a@example.com")
        bg.start_soon(in_thread, 2)
        await ran_count(2)
        await bg.wait_idle()
    assert sorted(ran) == [("in_thread", 2), ("welcome", 1)]
    assert bg.report.completed == 2
    assert journal_rows(path) == []


async def test_a_task_cut_short_is_deferred_then_recovered(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        for number in range(3):
            bg.start_soon(blocked, number)
        while bg.stats.running < 3:
            await trio.lowlevel.checkpoint()
    assert (bg.report.cancelled, bg.report.deferred) == (3, 3)
    rows = journal_rows(path)
    assert [(row.name, row.owner, row.state) for row in rows] == [
        ("tests.journal.blocked", None, "queued")
    ] * 3

    gate.set()
    async with trio_bg.open_background_nursery(journal=path) as bg:
        assert bg.stats.recovered == 3  # before the block starts: before serving
        await ran_count(3)
    assert sorted(ran) == [("blocked", 0), ("blocked", 1), ("blocked", 2)]
    assert (bg.report.recovered, bg.report.completed, bg.report.deferred) == (3, 3, 0)
    assert journal_rows(path) == []


async def test_recovery_takes_no_more_than_there_is_room_for(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        for number in range(30):
            bg.start_soon(blocked, number)
    assert bg.report.deferred == 30

    async with trio_bg.open_background_nursery(journal=path, max_running=4, max_pending=8) as bg:
        # Room for max_running + max_pending // 2: the rest of the pending room is
        # for new requests.
        assert bg.stats.recovered == 8
        assert bg.stats.running + bg.stats.pending == 8
        gate.set()
        await ran_count(30)  # the rest streams in as tasks end
        assert bg.stats.recovered == 30
    assert bg.report.completed == 30


async def test_startup_takes_one_round_of_rows_even_when_they_end_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trio_bg._keeping.journal_keeper, "CLAIM_BATCH", 2)  # a round takes 4 claims
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        for number in range(30):
            bg.start_soon(blocked, number)
    gate.set()  # from now on they end as soon as they start

    async with trio_bg.open_background_nursery(journal=path, max_running=4, max_pending=8) as bg:
        # Serving starts after one round: the rest comes as room frees, not before.
        assert bg.stats.recovered == 8
        await ran_count(30)
    assert bg.report.recovered == bg.report.completed == 30


async def test_the_last_failure_makes_a_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        bg.start_soon(flaky, 7)
        await ran_count(3)
        await bg.wait_idle()
    assert bg.report.failed == 1
    [row] = journal_rows(path)
    assert (row.name, row.state, row.attempt, row.owner) == ("tests.journal.flaky", "dead", 3, None)
    assert row.error == "attempt 3: RuntimeError('it always fails')"

    # A dead letter is not run again at the next start.
    async with trio_bg.open_background_nursery(journal=path) as bg:
        pass
    assert bg.report.recovered == 0


@trio_bg.task(name="tests.journal.patient", durable=True, retries=1, backoff=trio_bg.Backoff(60))
async def fails_then_waits(number: int) -> None:
    note("patient", number)
    raise RuntimeError("the first attempt fails")


async def test_a_shutdown_during_a_backoff_defers_the_task_with_its_attempt(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        bg.start_soon(fails_then_waits, 1)
        await ran_count(1)
        while bg.stats.retrying < 1:
            await trio.lowlevel.checkpoint()
    assert (bg.report.cancelled, bg.report.deferred) == (1, 1)
    [row] = journal_rows(path)
    assert (row.state, row.attempt, row.owner) == ("queued", 2, None)


async def test_a_row_of_an_unknown_name_stays_and_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    connection = _journal_schema.connect(str(path))
    owner = _journal_file.join(connection, 1.0)
    with _journal_schema.transaction(connection):
        _journal_file.append(connection, owner, [("gone.task", "[[1],{}]", 1)] * 2)
        _journal_file.leave(connection, owner, ())
    connection.close()
    async with trio_bg.open_background_nursery(journal=path) as bg:
        assert bg.stats.unknown == 2
    assert "2 task(s) of names no durable task here has" in caplog.text
    assert "gone.task (2)" in caplog.text
    assert [row.name for row in journal_rows(path)] == ["gone.task"] * 2


async def test_a_row_whose_arguments_no_longer_fit_is_a_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    connection = _journal_schema.connect(str(path))
    owner = _journal_file.join(connection, 1.0)
    with _journal_schema.transaction(connection):
        _journal_file.append(connection, owner, [("tests.journal.welcome", "[[1,2,3],{}]", 1)])
        _journal_file.leave(connection, owner, ())
    connection.close()
    async with trio_bg.open_background_nursery(journal=path) as bg:
        pass
    assert bg.report.recovered == 0
    [row] = journal_rows(path)
    assert row.state == "dead"
    assert row.error is not None and "cannot run from the journal" in row.error


async def test_an_in_memory_journal_for_tests() -> None:
    async with trio_bg.open_background_nursery(journal=":memory:") as bg:
        bg.start_soon(welcome, 5)
        await ran_count(1)
    assert bg.report.completed == 1


# -- the durability point: before the final body -------------------------------------


async def durable_endpoint(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    trio_bg.current_tasks().add_task(blocked, 1)
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"OK"})  # type: ignore[operator]


async def test_a_complete_response_means_its_tasks_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    app = trio_bg.BackgroundTaskMiddleware(durable_endpoint, journal=path, grace_period=0)
    async with run_lifespan(app), asgi_client(app) as client:
        response = await client.get("/")
        assert response.status_code == 200
        [row] = journal_rows(path)
        assert (row.name, row.state) == ("tests.journal.blocked", "queued")
        assert row.owner is not None  # claimed by this process, running
    assert app.report.deferred == 1


async def test_a_failed_commit_turns_the_response_into_a_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_journal, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "tasks.db"
    app = trio_bg.BackgroundTaskMiddleware(durable_endpoint, journal=path)
    async with run_lifespan(app), asgi_client(app) as client:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            response = await client.get("/")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert response.status_code == 503
        assert response.text == "Service Unavailable: the background task journal failed\n"
        assert app.nursery.stats.discarded == 1
    assert "database is locked" in caplog.text
    assert journal_rows(path) == []


async def test_a_streaming_response_is_aborted_when_the_commit_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_journal, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "tasks.db"

    async def streaming(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"part", "more_body": True})  # type: ignore[operator]
        trio_bg.current_tasks().add_task(welcome, 1)  # stored before the final body
        await send({"type": "http.response.body", "body": b"end"})  # type: ignore[operator]

    app = trio_bg.BackgroundTaskMiddleware(streaming, journal=path)
    async with run_lifespan(app), asgi_client(app) as client:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(JournalError, match="database is locked"):
                await client.get("/")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert app.nursery.stats.discarded == 1
    assert ran == []


async def test_tasks_are_stored_before_the_first_body_goes_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client may hold the whole body before the final message (a content-length
    body, then an empty final message, as Quart sends it): the tasks added so far are
    stored first, so a failure can still be a 503."""
    monkeypatch.setattr(_journal, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "tasks.db"

    async def in_two_messages(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        trio_bg.current_tasks().add_task(welcome, 1)
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"OK", "more_body": True})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    app = trio_bg.BackgroundTaskMiddleware(in_two_messages, journal=path)
    async with run_lifespan(app), asgi_client(app) as client:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            response = await client.get("/")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert response.status_code == 503
        assert (await client.get("/")).text == "OK"
        await ran_count(1)


async def test_a_response_that_does_not_complete_removes_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    app = trio_bg.BackgroundTaskMiddleware(durable_endpoint, journal=path)
    sent: list[str] = []

    async def send_fails_at_the_end(message: dict) -> None:  # type: ignore[type-arg]
        if message["type"] == "http.response.body":
            assert [row.state for row in journal_rows(path)] == ["queued"]  # stored first
            raise OSError("the connection was reset")
        sent.append(message["type"])

    async def receive() -> dict:  # type: ignore[type-arg]
        await trio.sleep_forever()
        raise AssertionError

    async with run_lifespan(app):
        scope = {"type": "http", "path": "/", "method": "GET", "headers": []}
        with pytest.raises(OSError, match="reset"):
            await app(scope, receive, send_fails_at_the_end)
        assert sent == ["http.response.start"]
        assert app.nursery.stats.discarded == 1
    assert journal_rows(path) == []
    assert ran == []


# -- journals that cannot be used ------------------------------------------------------


def not_an_sqlite_file(path: Path) -> None:
    path.write_bytes(b"these are not the tasks you are looking for\n" * 100)


def another_application(path: Path) -> None:
    sqlite3.connect(path).execute("CREATE TABLE accounts (id INTEGER)").connection.commit()


def newer_schema(path: Path) -> None:
    _journal_schema.connect(str(path)).execute("PRAGMA user_version = 99")


def corrupt(path: Path) -> None:
    connection = _journal_schema.connect(str(path))
    owner = _journal_file.join(connection, 1.0)
    with _journal_schema.transaction(connection):
        _journal_file.append(connection, owner, [("x", "[[" + "1," * 2000 + "1],{}]", 1)] * 50)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    data = bytearray(path.read_bytes())
    data[4096 + 100 : 4096 * 3] = b"\xff" * (4096 * 2 - 100)  # pages 2 and 3
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda path: None, "its directory .* does not exist"),
        (lambda path: path.mkdir(), "it is a directory"),
        (not_an_sqlite_file, "not an SQLite database at all"),
        (another_application, "is not a trio_bg journal"),
        (newer_schema, "schema version 99, newer than this trio_bg knows"),
        (corrupt, "corrupt"),
    ],
    ids=["missing directory", "a directory", "not SQLite", "another app's", "newer", "corrupt"],
)
async def test_a_journal_that_cannot_be_used_fails_the_startup(
    tmp_path: Path, spoil: object, message: str
) -> None:
    path = tmp_path / "tasks.db"
    if "does not exist" in message:
        path = tmp_path / "missing" / "tasks.db"
    spoil(path)  # type: ignore[operator]
    with pytest.raises(JournalError, match=message):
        async with trio_bg.open_background_nursery(journal=path):
            raise AssertionError("the block must not run")

    app = trio_bg.BackgroundTaskMiddleware(durable_endpoint, journal=path)
    with pytest.raises(StartupFailed) as failed:
        async with run_lifespan(app):
            raise AssertionError("the app must not start")
    assert failed.value.args[0]["type"] == "lifespan.startup.failed"


async def test_a_locked_journal_fails_the_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_journal, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "tasks.db"
    _journal_schema.connect(str(path)).close()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(JournalError, match="locked by another process"):
            async with trio_bg.open_background_nursery(journal=path):
                raise AssertionError("the block must not run")
    finally:
        locker.execute("ROLLBACK")
        locker.close()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"journal": 5}, "journal must be a file path"),
        ({"journal": ""}, "journal must be a file path"),
        ({"journal_lease": 0.5}, "journal_lease must be finite and >= 1"),
        ({"journal_synchronous": "off"}, "journal_synchronous must be one of full, normal"),
    ],
)
def test_journal_options_are_checked_up_front(options: dict[str, object], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        trio_bg.BackgroundTaskMiddleware(durable_endpoint, **options)  # type: ignore[arg-type]


async def test_the_journal_logs_no_arguments(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_bg")
    async with trio_bg.open_background_nursery(journal=tmp_path / "tasks.db") as bg:
        bg.start_soon(welcome, 1, to="private@example.com")
        await ran_count(1)
    assert "private@example.com" not in caplog.text


async def test_fastapi_background_tasks_of_a_durable_task_are_stored_before_the_response(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    app = fastapi.FastAPI()
    trio_bg_fastapi.install(app, journal=path, grace_period=0)

    @app.post("/orders/{number}")
    async def order(number: int, background_tasks: fastapi.BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(blocked, number)
        return {"number": number}

    async with open_test_client(app) as client:
        response = await client.post("/orders/7")
        assert response.json() == {"number": 7}
        [row] = journal_rows(path)
        assert (row.name, row.arguments) == ("tests.journal.blocked", "[[7],{}]")
    gate.set()
    async with trio_bg.open_background_nursery(journal=path) as bg:
        await ran_count(1)
    assert ran == [("blocked", 7)]
    assert bg.report.recovered == 1


async def test_quart_add_background_task_of_a_durable_task_keeps_it_durable(tmp_path: Path) -> None:
    from quart_trio import QuartTrio

    from trio_bg import quart_trio as trio_bg_quart_trio

    path = tmp_path / "tasks.db"
    app = QuartTrio(__name__)
    trio_bg_quart_trio.init_app(app, journal=path, grace_period=0)

    @app.route("/")
    async def index() -> str:
        app.add_background_task(blocked, 3)
        return "OK"

    async with served(cast(ASGIApp, app)) as client:
        assert (await client.get("/")).text == "OK"
        [row] = journal_rows(path)
        assert (row.name, row.arguments) == ("tests.journal.blocked", "[[3],{}]")
