"""Poisoned journals: rows that cannot be read, and tasks that kill their process.

A row no process can read is a dead letter naming its id and task (never its
arguments) while the others run; a run cut short by its process's death counts as an
attempt, so a task that kills its process cannot crash-loop the server.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
import trio
from conftest import asgi_client, run_lifespan
from processes import BOUND, Child, trio_bg_process
from redis_server import free_port

import trio_bg
from trio_bg._keeping import journal_file as _journal_file
from trio_bg._keeping import journal_schema as _journal_schema
from trio_bg._web.middleware import Receive, Scope, Send

ran: list[tuple[str, object]] = []
changed = trio.Event()
gate = trio.Event()


@pytest.fixture(autouse=True)
def fresh_records() -> Iterator[None]:
    global changed, gate
    ran.clear()
    changed, gate = trio.Event(), trio.Event()
    yield


def note(name: str, value: object) -> None:
    ran.append((name, value))
    changed.set()


async def ran_count(count: int) -> None:
    global changed
    while len(ran) < count:
        changed = trio.Event()
        await changed.wait()


@trio_bg.task(name="tests.poison.remember", durable=True)
async def remember(email: str) -> None:
    await gate.wait()
    note("remember", email)


@trio_bg.task(name="tests.poison.peek", durable=True)
async def peek(path: str) -> None:
    """Note whether the journal says this task has started, then wait for the gate."""
    with sqlite3.connect(path) as connection:
        [(started,)] = connection.execute("SELECT started FROM tasks").fetchall()
    note("peek", started)
    await gate.wait()


@trio_bg.task(name="tests.poison.fails", durable=True, retries=2)
async def fails(number: int) -> None:
    note("fails", number)
    raise RuntimeError("it always fails")


@trio_bg.task(name="tests.poison.plain", durable=True)
def plain(number: int) -> None:
    trio.from_thread.run_sync(note, "plain", number)


@trio_bg.task(name="tests.poison.generous", durable=True, retries=5)
async def generous(number: int) -> None:
    note("generous", number)


@trio_bg.task(name="tests.poison.fragile", durable=True, crash_limit=1)
async def fragile(number: int) -> None:
    note("fragile", number)


def journal_rows(path: Path) -> list[_journal_file.Row]:
    with sqlite3.connect(path) as connection:
        return _journal_file.rows(connection)


def plant(path: Path, *rows: tuple[str, str | bytes, object, bool]) -> list[int]:
    """Queued rows (name, arguments, attempt, started) that no process holds, written
    as they are: ``bytes`` arguments as text that is not UTF-8."""
    connection = _journal_schema.connect(str(path))
    ids = []
    with _journal_schema.transaction(connection):
        for name, arguments, attempt, started in rows:
            ids.append(
                connection.execute(
                    "INSERT INTO tasks (name, arguments, attempt, started, created) "
                    f"VALUES (?, {'CAST(? AS TEXT)' if isinstance(arguments, bytes) else '?'}, "
                    "?, ?, 0) RETURNING id",
                    (name, arguments, attempt, started),
                ).fetchone()[0]
            )
    connection.close()
    return ids


# -- what any HTTP client can send ---------------------------------------------------


async def signup(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    trio_bg.current_tasks().add_task(remember, json.loads(body)["email"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"OK"})


async def test_a_lone_surrogate_from_a_request_body_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    app = trio_bg.BackgroundTaskMiddleware(signup, journal=path, grace_period=0)
    async with run_lifespan(app), asgi_client(app) as client:
        response = await client.post("/", content=b'{"email": "ann\\ud800"}')
        assert response.status_code == 200
    assert app.report.deferred == 1
    with sqlite3.connect(path) as connection:  # valid UTF-8 text, as JSON escapes it
        [(arguments,)] = connection.execute("SELECT arguments FROM tasks").fetchall()
    assert arguments == '[["ann\\ud800"],{}]'

    gate.set()
    async with trio_bg.open_background_nursery(journal=path) as bg:
        await ran_count(1)
    assert ran == [("remember", "ann\ud800")]  # exactly what it was given
    assert bg.report.completed == 1
    assert journal_rows(path) == []


# -- rows that cannot be read --------------------------------------------------------

SECRET = "ann@example.com"

UNREADABLE: list[tuple[str, str | bytes, object, bool]] = [
    ("tests.poison.remember", f'[["{SECRET}\xff"],{{}}]'.encode("latin-1"), 1, False),
    ("tests.poison.remember", f"not JSON: {SECRET}", 1, False),
    ("tests.poison.remember", f'{{"email":"{SECRET}"}}', 1, False),
    ("tests.poison.remember", f'[["{SECRET}"],[]]', 1, False),
    ("tests.poison.remember", f'[["{SECRET}"],{{"to":"{SECRET}"}}]', 1, False),
    ("tests.poison.remember", "[" * 100_000, 1, False),
    ("tests.poison.remember", f'[["{SECRET}"],{{}}]', "first", False),
]


async def test_unreadable_rows_are_dead_letters_and_the_others_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    good = ("tests.poison.remember", '[["good"],{}]', 1, False)
    _, *bad, _ = plant(path, good, *UNREADABLE, good)
    gate.set()
    async with trio_bg.open_background_nursery(journal=path) as bg:
        await ran_count(2)
    assert ran == [("remember", "good")] * 2
    assert bg.report.recovered == 2
    rows = journal_rows(path)
    assert [row.id for row in rows] == bad
    for row in rows:
        assert row.state == "dead"
        assert row.error is not None and row.error.startswith("cannot run from the journal")
        assert SECRET not in row.error
        assert f"task {row.id} (tests.poison.remember) cannot run" in caplog.text
    assert SECRET not in caplog.text


async def test_journal_ls_lists_unreadable_rows(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    [id] = plant(path, UNREADABLE[0])

    async def ls(*options: str) -> str:
        with trio.fail_after(BOUND):
            result = await trio.run_process(
                [sys.executable, "-m", "trio_bg", "journal", "ls", f"--journal={path}", *options],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    listed = await ls("--show-arguments")
    assert f"{id}   queued  tests.poison.remember" in listed
    assert "1 queued (0 claimed by a process), 0 dead" in listed
    async with trio_bg.open_background_nursery(journal=path):
        pass
    listed = await ls()
    assert f"{id}   dead   tests.poison.remember" in listed
    assert "cannot run from the journal: its arguments are not UTF-8" in listed
    assert SECRET not in listed


# -- the schema ----------------------------------------------------------------------

VERSION_1 = """
CREATE TABLE tasks (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    name      TEXT    NOT NULL,
    arguments TEXT    NOT NULL,
    attempt   INTEGER NOT NULL DEFAULT 1,
    state     TEXT    NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'dead')),
    owner     INTEGER,
    created   REAL    NOT NULL,
    error     TEXT
);
CREATE INDEX tasks_by_state ON tasks (state, owner, id);
CREATE TABLE owners (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    pid     INTEGER NOT NULL,
    host    TEXT    NOT NULL,
    expires REAL    NOT NULL
);
PRAGMA application_id = 1953653351;
PRAGMA user_version = 1;
INSERT INTO tasks (name, arguments, attempt, created)
    VALUES ('tests.poison.remember', '[["queued"],{}]', 2, 0);
INSERT INTO tasks (name, arguments, state, created, error)
    VALUES ('tests.poison.remember', '[["dead"],{}]', 'dead', 0, 'attempt 1: boom');
"""


async def test_a_version_1_journal_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(VERSION_1)
    gate.set()
    async with trio_bg.open_background_nursery(journal=path) as bg:
        await ran_count(1)
    assert ran == [("remember", "queued")]
    assert bg.report.recovered == 1
    [row] = journal_rows(path)
    assert (row.state, row.error, row.started, row.sent) == ("dead", "attempt 1: boom", False, None)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (4,)
        # The task it ran ended, and its status is kept, as a new journal keeps them.
        assert connection.execute("SELECT name, state FROM ended").fetchall() == [
            ("tests.poison.remember", "completed")
        ]


# -- runs cut short by the death of their process ------------------------------------


async def test_a_start_is_recorded_before_the_task_runs_and_a_shutdown_does_not_count(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        bg.start_soon(peek, str(path))
        await ran_count(1)
    assert ran == [("peek", 1)]
    assert bg.report.deferred == 1
    [row] = journal_rows(path)  # cut short by the shutdown, which knows it: no attempt
    assert (row.attempt, row.started, row.owner) == (1, False, None)


async def test_a_run_its_process_died_in_counts_as_an_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    ids = plant(
        path,
        ("tests.poison.fails", "[[1],{}]", 2, True),  # runs as attempt 3, its last
        ("tests.poison.fails", "[[2],{}]", 3, True),
        ("tests.poison.plain", "[[3],{}]", 2, True),  # no retries: 3 attempts all the same
        ("tests.poison.plain", "[[4],{}]", 3, True),
        ("tests.poison.plain", "[[5],{}]", 3, False),  # attempt 3 has not started yet
        ("tests.poison.generous", "[[6],{}]", 5, True),
        ("tests.poison.fragile", "[[7],{}]", 1, True),
    )
    async with trio_bg.open_background_nursery(journal=path) as bg:
        await ran_count(4)
        await bg.wait_idle()
    assert sorted(ran) == [("fails", 1), ("generous", 6), ("plain", 3), ("plain", 5)]
    rows = {row.id: row for row in journal_rows(path)}
    assert sorted(rows) == [ids[0], ids[1], ids[3], ids[6]]
    assert rows[ids[0]].error == "attempt 3: RuntimeError('it always fails')"
    for id, attempt in ((ids[1], 3), (ids[3], 3), (ids[6], 1)):
        assert rows[id].state == "dead"
        assert (
            rows[id].error == f"attempt {attempt}: its process died while it ran, its last attempt"
        )
    assert "running attempt 3 of at most 3" in caplog.text
    assert "running attempt 6 of at most 6" in caplog.text


@pytest.mark.parametrize(
    ("crash_limit", "error"),
    [(True, TypeError), ("3", TypeError), (2.0, TypeError), (0, ValueError), (-1, ValueError)],
)
def test_crash_limit_is_checked(crash_limit: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="crash_limit must be"):
        trio_bg.task(name="tests.poison.bad", durable=True, crash_limit=crash_limit)  # type: ignore[arg-type]


LEASE = 1.0
"""The servers' journal lease: the next life claims a dead one's rows within about this."""


# kill_with_retries has retries=2; kill has none: the floor of 3 attempts.
@pytest.mark.parametrize("task", ["kill_with_retries", "kill"])
async def test_a_task_that_kills_its_process_stops_after_its_attempts(
    tmp_path: Path, task: str
) -> None:
    journal = tmp_path / "tasks.db"

    def life() -> AbstractAsyncContextManager[Child]:
        port = free_port()
        return trio_bg_process(
            "serve",
            "poison_app:app",
            f"--bind=127.0.0.1:{port}",
            f"--journal={journal}",
            f"--journal-lease={LEASE}",
            "--log-level=info",
            ready="",
            env={"TRIO_BG_TEST_LEDGER": str(tmp_path / "ledger")},
        )

    statuses = []
    for number in range(4):
        async with life() as server:
            with trio.fail_after(BOUND):
                if number == 0:
                    [match] = await server.output.wait_for(r"Running on (http://\S+)")
                    async with httpx.AsyncClient(base_url=match[1], trust_env=False) as http:
                        with contextlib.suppress(httpx.HTTPError):  # (the kill may come first)
                            await http.get(f"/{task}")
                if number < 3:
                    statuses.append(await server.process.wait())
                    continue
                await server.output.wait_for("becomes a dead letter")
                [match] = await server.output.wait_for(r"Running on (http://\S+)")
                async with httpx.AsyncClient(base_url=match[1], trust_env=False) as http:
                    assert (await http.get("/", params={"key": "after"})).status_code == 200
                while "after" not in (tmp_path / "ledger").read_text():  # noqa: ASYNC110
                    await trio.sleep(0.05)  # (a file another process appends to)
                statuses.append(await server.stop())
    assert statuses == [-signal.SIGKILL] * 3 + [0]  # three deaths, then it stays up
    runs = Counter(line.split()[0] for line in (tmp_path / "ledger").read_text().splitlines())
    assert runs[task] == 3
    [row] = journal_rows(journal)
    assert (row.name, row.state) == (f"tests.poison_app.{task}", "dead")
    assert row.error == "attempt 3: its process died while it ran, its last attempt"
