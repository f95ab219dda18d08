"""A paused owner (issue 18, item 9): a process whose lease lapsed while it was frozen
finds, once it renews, which rows went to another process, and cancels its own runs of
them; a task asks `lease_held` before a side effect that must never happen twice."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import pytest
import trio
from processes import BOUND, trio_bg_process
from redis_server import free_port
from test_journal_processes import Server, client, ledger_lines

import trio_bg
from trio_bg._keeping import journal_file as _journal_file
from trio_bg._keeping import journal_schema as _journal_schema

LEASE = 1.0

gate = trio.Event()
started = trio.Event()
held: list[bool] = []
release = threading.Event()


@pytest.fixture(autouse=True)
def fresh_records() -> Iterator[None]:
    global gate, started
    gate, started = trio.Event(), trio.Event()
    held.clear()
    release.clear()
    yield
    release.set()


@trio_bg.task(name="tests.journal_lease.blocked", durable=True)
async def blocked() -> None:
    held.append(trio_bg.lease_held())
    started.set()
    try:
        await gate.wait()
    finally:
        held.append(trio_bg.lease_held())


@trio_bg.task(name="tests.journal_lease.in_thread", durable=True)
def in_thread() -> None:
    held.append(trio_bg.lease_held())
    trio.from_thread.run_sync(started.set)
    release.wait(BOUND)
    held.append(trio_bg.lease_held())


def take_over(path: Path) -> int:
    """Do what another process does once this one's lease lapsed: reap its rows and
    claim them (in one transaction, so this one cannot renew in between); its id."""
    connection = sqlite3.connect(path, isolation_level=None)
    with closing(connection), _journal_schema.transaction(connection):
        connection.execute("UPDATE owners SET expires = 0")
        other: int = connection.execute(
            "INSERT INTO owners (pid, host, expires) VALUES (0, 'elsewhere', 1e12) RETURNING id"
        ).fetchone()[0]
        _journal_file.reap(connection, other)
        connection.execute("UPDATE tasks SET owner = ?", (other,))
    return other


def owners(path: Path) -> list[int | None]:
    with closing(sqlite3.connect(path)) as connection:
        return [owner for (owner,) in connection.execute("SELECT owner FROM tasks")]


async def test_an_owner_that_lost_its_lease_cancels_its_run_of_a_row_it_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, journal_lease=LEASE) as bg:
        bg.start_soon(blocked)
        with trio.fail_after(BOUND):
            await started.wait()
        other = take_over(path)
        with trio.fail_after(BOUND):  # the next renewal finds it out: a quarter lease
            await bg.wait_idle()
        assert bg.stats.cancelled == 1
    assert held == [True, False]
    assert (bg.report.lease_lost, bg.report.deferred) == (1, 0)
    assert owners(path) == [other]  # left to the process that took it
    assert "1 durable task(s) in this process's hands went to other processes" in caplog.text


async def test_a_thread_runs_on_but_never_settles_a_row_it_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, journal_lease=LEASE) as bg:
        bg.start_soon(in_thread)
        with trio.fail_after(BOUND):
            await started.wait()
        other = take_over(path)
        with trio.fail_after(BOUND):
            while "in threads run on" not in caplog.text:  # noqa: ASYNC110  (logged only)
                await trio.sleep(0.01)
        release.set()
        with trio.fail_after(BOUND):
            await bg.wait_idle()
        assert bg.stats.completed == 1  # (it could not be interrupted)
    assert held == [True, False]
    assert bg.report.lease_lost == 1
    assert owners(path) == [other]  # its end removed nothing: the row is another's


def test_a_late_finisher_never_writes_a_row_another_owner_holds(tmp_path: Path) -> None:
    with closing(_journal_schema.connect(str(tmp_path / "tasks.db"))) as connection:
        late = _journal_file.join(connection, 60)
        with _journal_schema.transaction(connection):
            [id] = _journal_file.append(connection, late, [("t", "[[],{}]", 1)])
        other = _journal_file.join(connection, 60)
        connection.execute("UPDATE tasks SET owner = ?", (other,))
        before = _journal_file.rows(connection)
        _journal_file.set_attempt(connection, late, id, 2)
        _journal_file.bury(connection, late, id, "failed")
        _journal_file.remove(connection, late, [id])
        assert _journal_file.rows(connection) == before


# -- real processes ------------------------------------------------------------------


@asynccontextmanager
async def lease_server(tmp_path: Path, name: str) -> AsyncIterator[Server]:
    """``python -m trio_bg serve lease_app:app`` on the tests' journal, 1 s lease."""
    port = free_port()
    report_path = tmp_path / f"{name}-report.json"
    async with trio_bg_process(
        "serve",
        "lease_app:app",
        f"--bind=127.0.0.1:{port}",
        f"--journal={tmp_path / 'tasks.db'}",
        f"--journal-lease={LEASE}",
        f"--report-json={report_path}",
        "--log-level=info",
        ready="Running on http://127.0.0.1",
        env={
            "TRIO_BG_TEST_LEDGER": str(tmp_path / "ledger"),
            "TRIO_BG_TEST_GO": str(tmp_path / "go"),
        },
    ) as child:
        yield Server(child.process, child.output, f"http://127.0.0.1:{port}", report_path)


async def noted(tmp_path: Path, *lines: str) -> None:
    """Return once the ledger has any of ``lines`` (the caller bounds the wait)."""
    # The ledger is a file that other processes append to: there is no event to wait on.
    while not set(lines) & set(ledger_lines(tmp_path)):  # noqa: ASYNC110
        await trio.sleep(0.02)


@asynccontextmanager
async def paused_owner(tmp_path: Path) -> AsyncIterator[tuple[Server, Server]]:
    """Two servers on one journal; the first runs task ``k``, then is frozen (SIGSTOP)
    until the second has taken the task over and started it; then the block runs."""
    async with lease_server(tmp_path, "first") as first, lease_server(tmp_path, "second") as second:
        async with client(first.url) as http:
            assert (await http.get("/", params={"key": "k"})).status_code == 200
        with trio.fail_after(BOUND):
            await noted(tmp_path, f"started k {first.process.pid}")
        first.process.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(BOUND):  # a lease, a quarter lease, a poll
                await noted(tmp_path, f"started k {second.process.pid}")
            yield first, second
        finally:
            first.process.send_signal(signal.SIGCONT)


async def test_a_paused_owner_cancels_its_run_once_it_resumes(tmp_path: Path) -> None:
    async with paused_owner(tmp_path) as (first, second):
        first.process.send_signal(signal.SIGCONT)
        with trio.fail_after(BOUND):
            await first.output.wait_for("went to other processes")
        (tmp_path / "go").touch()
        with trio.fail_after(BOUND):
            await noted(tmp_path, f"done k {second.process.pid}")
        assert await first.stop() == 1  # (a task was cut short)
        assert await second.stop() == 0
    assert ledger_lines(tmp_path) == [
        f"started k {first.process.pid}",
        f"started k {second.process.pid}",
        f"done k {second.process.pid}",
    ]
    report = json.loads(first.report_path.read_text())
    assert (report["lease_lost"], report["cancelled"], report["deferred"]) == (1, 1, 0)


async def test_a_paused_owner_resuming_sees_its_lease_is_not_held(tmp_path: Path) -> None:
    async with paused_owner(tmp_path) as (first, second):
        (tmp_path / "go").touch()  # both see it at once: the first, as soon as it resumes
        with trio.fail_after(BOUND):
            await noted(tmp_path, f"done k {second.process.pid}")
        first.process.send_signal(signal.SIGCONT)
        with trio.fail_after(BOUND):  # refused, or cancelled before it looked
            while not (  # noqa: ASYNC110
                f"refused k {first.process.pid}" in ledger_lines(tmp_path)
                or "went to other processes" in first.output.text
            ):
                await trio.sleep(0.02)
        await first.stop()
        await second.stop()
    assert f"done k {first.process.pid}" not in ledger_lines(tmp_path)
