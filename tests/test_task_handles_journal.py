"""Task handles and the journal: the id is the row's, a keyed durable task is stored once
by every nursery that shares the journal, its status and cancel reach the journal, and
``journal ls|retry|purge`` take the id."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_bg
from trio_bg._keeping import journal_file
from trio_bg._web.collection import RequestTasks, face_of

gate = trio.Event()
started = trio.Event()
ran: list[int] = []


@trio_bg.task(name="tests.handles.charge", durable=True, key="charge:{order_id}")
async def charge(order_id: int) -> None:
    started.set()  # (its start is in the journal by now)
    await gate.wait()
    ran.append(order_id)


def reset() -> None:
    global gate, started
    gate, started = trio.Event(), trio.Event()
    ran.clear()


@trio_bg.task(name="tests.handles.broken", durable=True, key="broken:{n}")
async def broken(n: int) -> None:
    ran.append(n)
    raise ValueError("no")


def rows(path: Path) -> list[journal_file.Row]:
    with sqlite3.connect(path) as connection:
        return journal_file.rows(connection)


def journal_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_bg", "journal", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_durable_tasks_id_is_its_rows_task_id(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        handle = bg.start_soon(charge, 1)
        await started.wait()
        [row] = rows(path)
        assert row.task_id == handle.id
        status = await bg.task_status(handle.id)
        assert status is not None and status.state == "running"
    listed = json.loads(journal_command("ls", "--journal", str(path), "--json").stdout)
    assert [entry["task_id"] for entry in listed] == [handle.id]  # deferred by the shutdown


async def test_two_nurseries_sharing_a_journal_store_a_keyed_task_once(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with (
        trio_bg.open_background_nursery(journal=path) as first,
        trio_bg.open_background_nursery(journal=path) as second,
    ):
        one = first.start_soon(charge, 7)
        await started.wait()
        two = second.start_soon(charge, 7)  # the same order: the same id, stored once
        await second.wait_idle()
        assert two == one
        assert second.stats.deduplicated == 1 and second.stats.accepted == 0
        # The second nursery reads the first one's task in the journal.
        status = await second.task_status(one.id)
        assert status is not None and (status.id, status.state) == (one.id, "running")
        gate.set()
        await first.wait_idle()
    assert ran == [7]
    assert rows(path) == []


async def test_cancel_task_removes_a_durable_task_from_the_journal(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        handle = bg.start_soon(charge, 3)
        await started.wait()
        assert await bg.cancel_task(handle.id) is True
        status = await bg.wait_task(handle.id)
        await bg.wait_idle()
    assert status.state == "cancelled"
    assert bg.report.deferred == 0 and bg.report.all_completed
    assert ran == []
    assert rows(path) == []


async def test_an_unclaimed_row_of_another_process_is_seen_and_can_be_cancelled(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path):
        pass  # (a journal of this schema)
    task_id = "ab" * 16
    with sqlite3.connect(path) as connection:  # a task no durable function here has
        connection.execute(
            "INSERT INTO tasks (name, arguments, created, task_id) "
            "VALUES ('tests.handles.elsewhere', '[[],{}]', 0, ?)",
            (task_id,),
        )
    async with trio_bg.open_background_nursery(journal=path) as bg:
        status = await bg.task_status(task_id)
        assert status is not None
        assert (status.name, status.state) == ("tests.handles.elsewhere", "deferred")
        assert await bg.cancel_task(task_id) is True
        assert await bg.task_status(task_id) is None
        assert await bg.cancel_task(task_id) is False
    assert rows(path) == []


async def test_a_dead_letter_is_retried_and_purged_by_its_task_id(tmp_path: Path) -> None:
    ran.clear()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        handle = bg.start_soon(broken, 5)
        status = await bg.wait_task(handle.id)
    assert status.state == "failed"
    [row] = rows(path)
    assert (row.state, row.task_id) == ("dead", handle.id)
    retried = journal_command("retry", "--journal", str(path), handle.id)
    assert retried.returncode == 0, retried.stderr
    assert rows(path)[0].state == "queued"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        await bg.wait_idle()
    assert ran == [5, 5]
    purged = journal_command("purge", "--journal", str(path), handle.id)
    assert purged.returncode == 0, purged.stderr
    assert rows(path) == []
    wrong = journal_command("purge", "--journal", str(path), "not-an-id")
    assert wrong.returncode == 2 and "not a row id or a task id" in wrong.stderr


async def test_adding_a_keyed_task_again_requeues_its_dead_letter(tmp_path: Path) -> None:
    ran.clear()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        first = bg.start_soon(broken, 6)
        await bg.wait_task(first.id)
        again = bg.start_soon(broken, 6)  # ended (dead): the key is free again
        await bg.wait_task(again.id)
    assert again.id == first.id
    assert ran == [6, 6]
    [row] = rows(path)
    assert (row.state, row.attempt) == ("dead", 1)


@trio_bg.task(name="tests.handles.report", durable=True)
async def build_report(month: str) -> None:
    trio_bg.set_progress(0.25, f"{month}: week 1 of 4")
    started.set()
    await gate.wait()


async def test_a_durable_tasks_progress_is_kept_in_its_row(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with (
        trio_bg.open_background_nursery(journal=path) as first,
        trio_bg.open_background_nursery(journal=path) as second,
    ):
        global started
        handle = first.start_soon(build_report, "2026-11")
        await started.wait()
        # Not awaited by the task, it rides along with the journal's next commit: the
        # store of a task added after it, say (committed once that task runs).
        started = trio.Event()
        first.start_soon(charge, 99)
        await started.wait()
        row = next(row for row in rows(path) if row.task_id == handle.id)
        assert (row.progress, row.message) == (0.25, "2026-11: week 1 of 4")
        seen = await second.task_status(handle.id)  # another process's view
        assert seen is not None
        assert (seen.state, seen.progress, seen.message) == ("running", 0.25, row.message)
        gate.set()


async def test_a_keyed_duplicate_in_an_ordered_request_passes_the_turn_on(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    after: list[str] = []

    async def next_in_line() -> None:
        after.append("ran")

    async with (
        trio_bg.open_background_nursery(journal=path) as first,
        trio_bg.open_background_nursery(journal=path) as second,
    ):
        one = first.start_soon(charge, 11)
        await started.wait()
        request = RequestTasks(second, ordered=True)
        tasks = face_of(request)
        two = tasks.add_task(charge, 11)  # the other process's: a duplicate here
        tasks.add_task(next_in_line)
        await request.commit()
        request.hand_off()
        with pytest.raises(TimeoutError):  # the other process's task: read in the journal
            await second.wait_task(two.id, timeout=0.2)
        await second.wait_idle()
        assert after == ["ran"]
        assert (second.stats.deduplicated, second.stats.reserved) == (1, 0)
        gate.set()
        ended = await second.wait_task(two.id, timeout=30)  # its end, as the journal keeps it
        assert (ended.id, ended.state) == (one.id, "completed")
    assert two == one


release = threading.Event()


@trio_bg.task(name="tests.handles.plain", durable=True)
def plain(n: int) -> None:
    release.wait(10)
    ran.append(n)


async def test_cancelling_a_durable_plain_task_no_thread_took_removes_its_row(
    tmp_path: Path,
) -> None:
    reset()
    release.clear()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, thread_limit=1) as bg:
        handles = {1: bg.start_soon(plain, 1), 2: bg.start_soon(plain, 2)}
        # Either may get the one thread first (each is stored by a trio task of its own).
        with trio.fail_after(10):
            while not (running := await running_of(bg, handles)):  # noqa: ASYNC110
                await trio.sleep(0.01)
        [waiting] = set(handles) - {running}
        assert await bg.cancel_task(handles[waiting].id) is True
        release.set()
        await bg.wait_idle()
    assert ran == [running]
    assert bg.report.deferred == 0 and bg.report.cancelled_on_request == 1
    assert rows(path) == []


async def running_of(bg: trio_bg.BackgroundNursery, handles: dict[int, trio_bg.TaskHandle]) -> int:
    """Which of ``handles`` runs now (0: none yet)."""
    for n, handle in handles.items():
        status = await bg.task_status(handle.id)
        if status is not None and status.state == "running":
            return n
    return 0


# -- statuses kept in the journal once tasks end ---------------------------------------


@trio_bg.task(name="tests.handles.invoice", durable=True)
async def invoice(customer: str) -> dict[str, str]:
    started.set()
    await gate.wait()
    return {"invoice": f"INV-{len(customer)}"}


def ended_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT * FROM ended").fetchall()


async def test_an_ended_durable_tasks_status_is_read_by_another_process(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with (
        trio_bg.open_background_nursery(journal=path) as first,
        trio_bg.open_background_nursery(journal=path) as second,
    ):
        handle = first.start_soon(invoice, "ada@example.com")
        await started.wait()
        async with trio.open_nursery() as waiting:
            waited: list[trio_bg.TaskStatus] = []

            async def wait_in_second() -> None:
                waited.append(await second.wait_task(handle.id, timeout=30))

            waiting.start_soon(wait_in_second)
            await trio.testing.wait_all_tasks_blocked()
            assert waited == []  # running in the first process: the second waits
            gate.set()
        [status] = waited
        assert (status.id, status.name, status.state) == (
            handle.id,
            "tests.handles.invoice",
            "completed",
        )
        assert status.result == {"invoice": "INV-15"}
        assert status.started_at is not None and status.ended_at is not None
        assert status.created_at is not None and status.created_at <= status.started_at
        assert await second.task_status(handle.id) == status
    assert rows(path) == []  # the row went; its status stays, without its arguments
    [kept] = ended_rows(path)
    assert handle.id in kept and not any("ada@example.com" in str(value) for value in kept)
    async with trio_bg.open_background_nursery(journal=path) as restarted:
        assert await restarted.task_status(handle.id) == status  # and across a restart


async def test_a_durable_task_cancelled_on_request_is_kept_cancelled(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        handle = bg.start_soon(charge, 4)
        await started.wait()
        assert await bg.cancel_task(handle.id)
        await bg.wait_task(handle.id)
    async with trio_bg.open_background_nursery(journal=path) as other:
        status = await other.task_status(handle.id)
    assert status is not None and status.state == "cancelled"


@trio_bg.task(name="tests.handles.refund", durable=True, key="refund:{order_id}", key_ttl=600)
async def refund(order_id: int) -> None:
    ran.append(order_id)


async def test_a_key_held_past_its_end_refuses_a_second_run_in_another_process(
    tmp_path: Path,
) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as first:
        one = first.start_soon(refund, 8)
        await first.wait_task(one.id)
    async with trio_bg.open_background_nursery(journal=path) as second:
        two = second.start_soon(refund, 8)  # a client's retry, in another process
        await second.wait_idle()
        assert (two, second.stats.deduplicated, second.stats.accepted) == (one, 1, 0)
        status = await second.task_status(two.id)
        assert status is not None and status.state == "completed"
        other = second.start_soon(refund, 9)  # another key: it runs
        await second.wait_task(other.id)
    assert ran == [8, 9]


async def test_no_status_is_kept_with_journal_statuses_kept_for_0(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path, journal_statuses_kept_for=0) as bg:
        handle = bg.start_soon(refund, 10)
        assert (await bg.wait_task(handle.id)).state == "completed"  # (in memory)
    assert ended_rows(path) == [] and rows(path) == []
    async with trio_bg.open_background_nursery(journal=path) as other:
        assert await other.task_status(handle.id) is None


def test_sweep_forgets_old_statuses_but_not_keys_still_held(tmp_path: Path) -> None:
    from trio_bg._keeping import journal_schema

    connection = journal_schema.connect(str(tmp_path / "tasks.db"))
    now = time.time()
    for task_id, ended, key_until in (
        ("old", now - 7200, None),
        ("old-key-held", now - 7200, now + 60),
        ("old-key-gone", now - 7200, now - 60),
        ("new", now - 60, None),
    ):
        connection.execute(
            "INSERT INTO ended (task_id, name, state, attempt, created, ended, key_until) "
            "VALUES (?, 'n', 'completed', 1, 0, ?, ?)",
            (task_id, ended, key_until),
        )
    assert journal_file.sweep(connection, 3600) == 2
    kept = sorted(id for (id,) in connection.execute("SELECT task_id FROM ended"))
    assert kept == ["new", "old-key-held"]
    assert journal_file.counts(connection)["ended"] == 2
    connection.close()


async def test_journal_ls_counts_the_statuses_kept(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        await bg.wait_task(bg.start_soon(refund, 12).id)
    listed = journal_command("ls", "--journal", str(path))
    assert listed.stdout.splitlines() == ["0 queued (0 claimed by a process), 0 dead, 1 ended"]


async def test_a_process_that_keeps_no_statuses_sweeps_those_kept_before(tmp_path: Path) -> None:
    reset()
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        held = bg.start_soon(refund, 13)  # (key_ttl 600: its key is held)
        await bg.wait_task(held.id)
        await bg.wait_task(bg.start_soon(invoice_now, "x").id)
    assert len(ended_rows(path)) == 2
    async with trio_bg.open_background_nursery(
        journal=path, journal_statuses_kept_for=0, journal_lease=1
    ):
        with trio.fail_after(10):
            while True:  # (swept as it renews its lease: the file tells no one)
                if len(ended_rows(path)) == 1:
                    break
                await trio.sleep(0.05)
    [(task_id, *_)] = ended_rows(path)
    assert task_id == held.id  # the keyed one: its key is still held


@trio_bg.task(name="tests.handles.invoice_now", durable=True)
async def invoice_now(customer: str) -> None:
    pass
