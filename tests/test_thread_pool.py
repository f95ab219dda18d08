"""Plain-function tasks in the nursery's own worker threads: every guarantee of a thread
task, under load, racing timeouts and the shutdown."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_bg
from trio_bg._engine import thread_pool as _thread_pool

BOUND = 15.0
"""Seconds any single wait may take before the test fails (generous: a noisy machine)."""

request_id: contextvars.ContextVar[int] = contextvars.ContextVar("request_id")


def workers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "trio_bg worker"]


async def until_no_workers() -> None:
    # Threads end on their own: nothing to wait on but their list.
    while workers():  # noqa: ASYNC110
        await trio.sleep(0.01)


def balanced(stats: trio_bg.TaskStats) -> bool:
    return stats.accepted == stats.pending + stats.running + stats.finished


async def test_thousands_of_short_thread_tasks_race_their_timeouts_and_the_shutdown() -> None:
    unbalanced: list[trio_bg.TaskStats] = []
    ran_to_the_end = 0
    lock = threading.Lock()

    def on_event(event: trio_bg.TaskEvent) -> None:
        if not balanced(stats := nursery.stats):
            unbalanced.append(stats)

    @trio_bg.task(timeout=0.002)
    def short(seconds: float) -> None:
        nonlocal ran_to_the_end
        time.sleep(seconds)
        with lock:
            ran_to_the_end += 1

    with trio.fail_after(BOUND):
        async with trio_bg.open_background_nursery(
            thread_limit=8, grace_period=0.05, on_event=on_event, max_pending=5_000
        ) as nursery:
            for number in range(3_000):
                nursery.start_soon(short, (number % 4) * 0.001)
                if number % 100 == 0:
                    await trio.lowlevel.checkpoint()
    report = nursery.report
    assert unbalanced == []
    assert report.accepted == 3_000
    assert report.accepted == (
        report.completed + report.failed + report.timed_out + report.cancelled + report.abandoned
    )
    assert report.completed > 0 and report.cancelled > 0  # the shutdown cut the queue short
    # Only tasks that started can have run: none of the cancelled ones ever does.
    assert ran_to_the_end <= report.completed + report.timed_out + report.abandoned


async def test_an_abandoned_thread_is_replaced() -> None:
    release = threading.Event()
    ran = trio.Event()
    token = trio.lowlevel.current_trio_token()

    started = trio.Event()

    @trio_bg.task(timeout=0.05)
    def stuck() -> None:
        token.run_sync_soon(started.set)
        release.wait(BOUND)

    def after() -> None:
        token.run_sync_soon(ran.set)

    try:
        with trio.fail_after(BOUND):
            async with trio_bg.open_background_nursery(thread_limit=1) as nursery:
                nursery.start_soon(stuck)
                await started.wait()
                nursery.start_soon(after)  # runs while `stuck` still holds its thread
                await ran.wait()
                assert nursery.stats.threads_in_use >= 1  # `stuck`, abandoned, still runs
    finally:
        release.set()
    assert (nursery.report.timed_out, nursery.report.completed) == (1, 1)


async def test_tasks_cancelled_while_queued_never_run() -> None:
    release = threading.Event()
    started = trio.Event()
    ran: list[int] = []
    token = trio.lowlevel.current_trio_token()

    def hold() -> None:
        token.run_sync_soon(started.set)
        release.wait(BOUND)

    def queued(number: int) -> None:
        ran.append(number)

    try:
        with trio.fail_after(BOUND):
            async with trio_bg.open_background_nursery(thread_limit=1, grace_period=0) as nursery:
                nursery.start_soon(hold)
                await started.wait()
                for number in range(20):
                    nursery.start_soon(queued, number)
                await trio.testing.wait_all_tasks_blocked()
                assert nursery.stats.pending == 20
    finally:
        release.set()
    assert (nursery.report.abandoned, nursery.report.cancelled) == (1, 20)
    await trio.to_thread.run_sync(time.sleep, 0.05)  # a late thread would run one now
    assert ran == []


async def test_each_task_runs_in_its_own_copy_of_the_context() -> None:
    seen: dict[int, int] = {}

    def look(expected: int) -> None:
        seen[expected] = request_id.get()
        request_id.set(-1)  # in its own copy: no other task sees it

    async with trio_bg.open_background_nursery(thread_limit=3) as nursery:
        for number in range(200):
            request_id.set(number)
            nursery.start_soon(look, number)
    assert seen == {number: number for number in range(200)}


async def test_a_failure_in_a_thread_task_is_its_own(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[tuple[str, BaseException]] = []

    def fails() -> None:
        raise ValueError("the PDF renderer crashed")

    def works() -> None:
        pass

    async with trio_bg.open_background_nursery(
        on_error=lambda name, exc: errors.append((name, exc))
    ) as nursery:
        nursery.start_soon(fails)
        nursery.start_soon(works)
    assert (nursery.report.failed, nursery.report.completed) == (1, 1)
    assert [(name, type(exc)) for name, exc in errors] == [
        ("test_a_failure_in_a_thread_task_is_its_own.<locals>.fails", ValueError)
    ]
    assert "the PDF renderer crashed" in caplog.text


async def test_system_exit_in_a_thread_task_shuts_the_nursery_down_then_goes_on_up() -> None:
    def exits() -> None:
        raise SystemExit(4)

    with pytest.raises(SystemExit):
        async with trio_bg.open_background_nursery() as nursery:
            nursery.start_soon(exits)
            await trio.sleep_forever()
    assert nursery.report.failed == 1


async def test_idle_threads_end_and_none_outlives_the_nursery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_thread_pool, "IDLE_TIMEOUT", 0.05)
    with trio.fail_after(BOUND):
        await until_no_workers()  # (other tests' idle threads)
        async with trio_bg.open_background_nursery(thread_limit=4) as nursery:
            for _ in range(4):
                nursery.start_soon(time.sleep, 0.01)
            await nursery.wait_idle()
            assert 1 <= len(workers()) <= 4
            await until_no_workers()  # idle for IDLE_TIMEOUT: they end
            nursery.start_soon(time.sleep, 0)
            await nursery.wait_idle()
        await until_no_workers()  # the nursery closed its pool


async def test_trio_from_thread_works_in_a_thread_task() -> None:
    seen: list[str] = []

    def calls_back() -> None:
        trio.from_thread.run_sync(seen.append, "from the worker thread")

    async with trio_bg.open_background_nursery() as nursery:
        nursery.start_soon(calls_back)
    assert seen == ["from the worker thread"]


async def test_a_thread_tasks_timeout_runs_from_its_own_start(
    mock_clock: trio.testing.MockClock,
) -> None:
    """One trio task keeps every thread task's deadline: a task that starts later with
    a shorter timeout must wake it, not wait for the earlier task's longer one. (The
    clock moves only when told: threads report in real time.)"""
    release = threading.Event()
    events: list[trio_bg.TaskEvent] = []
    changed = trio.Event()

    def on_event(event: trio_bg.TaskEvent) -> None:
        events.append(event)
        changed.set()

    async def until_started(count: int) -> None:  # (threads report in real time)
        nonlocal changed
        while sum(event.kind == "started" for event in events) < count:
            changed = trio.Event()
            await changed.wait()

    async def finished_after(seconds: float) -> list[tuple[str, str | None, float | None]]:
        mock_clock.jump(seconds)
        await trio.testing.wait_all_tasks_blocked()  # (the keeper has had its turn)
        return [(e.name, e.outcome, e.duration) for e in events if e.kind == "finished"]

    @trio_bg.task(name="slow", timeout=10)
    def slow() -> None:
        release.wait(BOUND)

    @trio_bg.task(name="quick", timeout=1)
    def quick() -> None:
        release.wait(BOUND)

    try:
        async with trio_bg.open_background_nursery(on_event=on_event) as bg:
            bg.start_soon(slow)
            await until_started(1)
            bg.start_soon(quick)
            await until_started(2)
            assert await finished_after(1) == [("quick", "timed_out", 1.0)]
            assert await finished_after(9) == [
                ("quick", "timed_out", 1.0),
                ("slow", "timed_out", 10.0),
            ]
    finally:
        release.set()
    assert bg.report.timed_out == 2
