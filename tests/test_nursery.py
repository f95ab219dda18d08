"""BackgroundNursery: running, states and their books, limits, timeouts, shutdown."""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import task_with_a_cleanup_bug

import trio_bg
from trio_bg._engine.thread_pool import ThreadPool
from trio_bg._web.collection import RequestTasks, face_of


async def broken(secret: str = "") -> None:
    raise ValueError("boom")


async def forever() -> None:
    await trio.sleep_forever()


async def slow(n: int) -> None:
    await trio.sleep(60)


async def work(seconds: float) -> None:
    await trio.sleep(seconds)


def assert_books_balance(stats: trio_bg.TaskStats) -> None:
    assert stats.accepted == stats.pending + stats.running + stats.finished, stats


def assert_report_balances(report: trio_bg.ShutdownReport) -> None:
    ended = report.completed + report.failed + report.timed_out + report.cancelled
    assert report.accepted == ended + report.abandoned, report
    assert len(report.unfinished) == report.cancelled + report.abandoned, report


async def test_async_and_thread_tasks_run_and_complete() -> None:
    trio_thread = threading.get_ident()
    seen: dict[str, Any] = {}

    async def async_job(value: int, *, key: str) -> None:
        seen[key] = value

    def thread_job(value: int) -> None:
        seen["thread"] = (value, threading.get_ident() != trio_thread)

    async with trio_bg.open_background_nursery() as nursery:
        nursery.start_soon(async_job, 1, key="async")
        nursery.start_soon(thread_job, 2)
        await nursery.wait_idle()
        assert nursery.stats.completed == 2
    assert seen == {"async": 1, "thread": (2, True)}
    assert nursery.report.all_completed
    assert_report_balances(nursery.report)


async def test_a_failing_task_is_logged_counted_and_hooked_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[tuple[str, BaseException]] = []
    survivor_done = trio.Event()

    async def survivor() -> None:
        await trio.lowlevel.checkpoint()
        survivor_done.set()

    async with trio_bg.open_background_nursery(
        on_error=lambda name, exc: errors.append((name, exc))
    ) as nursery:
        nursery.start_soon(broken, "hunter2")
        nursery.start_soon(survivor)
        await survivor_done.wait()
        await nursery.wait_idle()
        assert (nursery.stats.failed, nursery.stats.completed) == (1, 1)
    assert [(name, type(exc)) for name, exc in errors] == [("broken", ValueError)]
    failure = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert failure.name == "trio_bg" and "broken" in failure.getMessage()
    assert failure.exc_info is not None and failure.exc_info[0] is ValueError
    assert "hunter2" not in caplog.text  # arguments are never logged


async def test_a_broken_on_error_hook_does_not_break_the_nursery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def bad_hook(name: str, exc: BaseException) -> None:
        raise RuntimeError("hook broke")

    async def broken() -> None:
        raise ValueError

    async with trio_bg.open_background_nursery(on_error=bad_hook) as nursery:
        nursery.start_soon(broken)
    assert nursery.report.failed == 1
    assert "the on_error hook failed" in caplog.text


async def test_a_plain_function_returning_a_coroutine_is_a_failure_not_silence() -> None:
    async def real_work() -> None:
        pass

    def looks_sync() -> Any:
        return real_work()

    async with trio_bg.open_background_nursery() as nursery:
        nursery.start_soon(looks_sync)
    assert nursery.report.failed == 1


async def test_tasks_run_in_a_copy_of_the_context_they_were_added_in() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str] = []

    async def async_job() -> None:
        seen.append(request_id.get())

    def thread_job() -> None:
        seen.append(request_id.get())

    async with trio_bg.open_background_nursery() as nursery:
        request_id.set("r-1")
        nursery.start_soon(async_job)
        nursery.start_soon(thread_job)
        request_id.set("r-2")  # later changes do not reach tasks already added
        await nursery.wait_idle()
    assert seen == ["r-1", "r-1"]


async def test_the_grace_period_lets_work_finish(autojump_clock: trio.testing.MockClock) -> None:
    async def five_seconds() -> None:
        await trio.sleep(5)

    async with trio_bg.open_background_nursery(grace_period=10) as nursery:
        nursery.start_soon(five_seconds)
    assert nursery.report.completed == 1
    assert nursery.report.duration == pytest.approx(5)


async def test_what_outlives_the_grace_period_is_cancelled_and_named(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio_bg.open_background_nursery(grace_period=10) as nursery:
        nursery.start_soon(forever)
        nursery.start_soon(work, 1)
    report = nursery.report
    assert (report.completed, report.cancelled, report.unfinished) == (1, 1, ("forever",))
    assert report.duration == pytest.approx(10)
    assert not report.all_completed
    assert_report_balances(report)


async def test_the_unfinished_are_logged_once_a_name_with_their_count(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the log line named every task, 10,000 names for 10,000 tasks."""
    async with trio_bg.open_background_nursery(grace_period=1) as nursery:
        nursery.start_soon(forever)
        for n in range(300):
            nursery.start_soon(slow, n)
    assert len(nursery.report.unfinished) == 301
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unfinished")]
    assert logged == ["unfinished background tasks: slow (300), forever"]


async def test_a_thread_that_ignores_cancellation_is_abandoned() -> None:
    release = threading.Event()
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    @trio_bg.task(name="stubborn")
    def stubborn() -> None:
        token.run_sync_soon(started.set)
        release.wait(10)

    try:
        async with trio_bg.open_background_nursery(grace_period=0.05) as nursery:
            nursery.start_soon(stubborn)
            await started.wait()
    finally:
        release.set()
    assert (nursery.report.abandoned, nursery.report.unfinished) == (1, ("stubborn",))


async def test_a_thread_task_still_waiting_for_a_thread_is_cancelled_not_abandoned() -> None:
    release = threading.Event()
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def hold_the_only_thread() -> None:
        token.run_sync_soon(started.set)
        release.wait(10)

    def never_gets_a_thread() -> None:
        raise AssertionError("must not run")

    try:
        async with trio_bg.open_background_nursery(grace_period=0.05, thread_limit=1) as nursery:
            nursery.start_soon(hold_the_only_thread)
            await started.wait()
            nursery.start_soon(never_gets_a_thread)
    finally:
        release.set()
    assert (nursery.report.abandoned, nursery.report.cancelled) == (1, 1)


async def test_shutdown_stops_admitting_and_says_so() -> None:
    async def job() -> None:
        pass

    async with trio_bg.open_background_nursery() as nursery:
        report = await nursery.shutdown()
        assert nursery.closed
        with pytest.raises(trio_bg.NurseryClosed, match="shutting down"):
            nursery.start_soon(job)
        assert await nursery.shutdown() is report  # idempotent
    assert nursery.report is report
    assert isinstance(trio_bg.NurseryClosed(), trio_bg.Overloaded)
    assert isinstance(trio_bg.NurseryClosed(), RuntimeError)


async def test_the_report_is_not_there_before_shutdown() -> None:
    async with trio_bg.open_background_nursery() as nursery:
        with pytest.raises(RuntimeError, match="not finished shutting down"):
            nursery.report  # noqa: B018


async def test_an_error_in_the_block_cancels_at_once_and_comes_back_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with trio_bg.open_background_nursery(grace_period=100) as nursery:
            nursery.start_soon(forever)
            await trio.sleep(1)
            raise KeyError("mine")
    assert nursery.report.cancelled == 1
    assert nursery.report.duration == 0


async def test_tasks_have_a_cancel_scope_of_their_own() -> None:
    """Cancelling the tasks at the end of the grace period leaves the block running."""

    async with trio_bg.open_background_nursery(grace_period=0) as nursery:
        nursery.start_soon(forever)
        await nursery.shutdown()
        await trio.lowlevel.checkpoint()  # would raise Cancelled if the block were cancelled
        after_shutdown = True
    assert after_shutdown


async def test_cancellation_from_outside_still_leaves_a_report() -> None:
    with trio.CancelScope() as scope:
        async with trio_bg.open_background_nursery(grace_period=100) as nursery:
            nursery.start_soon(forever)
            await trio.lowlevel.checkpoint()
            scope.cancel()
            await trio.sleep_forever()
    assert nursery.report.cancelled == 1


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"grace_period": -1}, ValueError, "grace_period"),
        ({"grace_period": float("nan")}, ValueError, "grace_period"),
        ({"grace_period": "10"}, TypeError, "grace_period"),
        ({"thread_limit": 0}, ValueError, "thread_limit"),
        ({"thread_limit": 2.0}, TypeError, "thread_limit"),
        ({"max_running": 0}, ValueError, "max_running"),
        ({"max_pending": -1}, ValueError, "max_pending"),
        ({"max_pending": True}, TypeError, "max_pending"),
        ({"on_error": "log"}, TypeError, "on_error"),
        ({"on_event": 1}, TypeError, "on_event"),
        ({"grace": 1}, TypeError, "unknown option.*'grace'.*grace_period"),
    ],
)
async def test_bad_options_are_refused_up_front(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        async with trio_bg.open_background_nursery(**options):
            raise AssertionError("must not get here")


# -- limits ----------------------------------------------------------------------------


async def test_max_running_holds_the_rest_pending_in_arrival_order() -> None:
    gates = [trio.Event() for _ in range(4)]
    order: list[int] = []

    async def job(n: int) -> None:
        order.append(n)
        await gates[n].wait()

    async with trio_bg.open_background_nursery(max_running=2) as nursery:
        for n in range(4):
            nursery.start_soon(job, n)
        await trio.testing.wait_all_tasks_blocked()
        stats = nursery.stats
        # trio runs tasks spawned in one tick in random order; the queue is FIFO.
        assert (stats.running, stats.pending, sorted(order)) == (2, 2, [0, 1])
        assert_books_balance(stats)
        gates[1].set()
        await trio.testing.wait_all_tasks_blocked()
        assert order[2:] == [2]
        for gate in gates:
            gate.set()
    assert order[2:] == [2, 3]
    assert nursery.report.completed == 4


async def test_a_full_nursery_refuses_with_overloaded_and_counts_it() -> None:
    gate = trio.Event()

    async def job() -> None:
        await gate.wait()

    async with trio_bg.open_background_nursery(max_running=1, max_pending=1) as nursery:
        nursery.start_soon(job)
        nursery.start_soon(job)
        with pytest.raises(trio_bg.Overloaded, match="full"):
            nursery.start_soon(job)
        assert nursery.stats.rejected == 1
        gate.set()
        await nursery.wait_idle()
        nursery.start_soon(job)  # room again once the work drained
    assert nursery.report.completed == 3


async def test_collected_tasks_hold_their_room_until_handed_off_or_discarded() -> None:
    async with trio_bg.open_background_nursery(max_running=1, max_pending=1) as nursery:
        first, second = RequestTasks(nursery, ordered=False), RequestTasks(nursery, ordered=False)
        face_of(first).add_task(trio.sleep, 0)
        face_of(first).add_task(trio.sleep, 0)
        assert nursery.stats.reserved == 2
        with pytest.raises(trio_bg.Overloaded):
            face_of(second).add_task(trio.sleep, 0)
        first.discard("the test says so")
        stats = nursery.stats
        assert (stats.reserved, stats.discarded, stats.accepted) == (0, 2, 0)
        face_of(second).add_task(trio.sleep, 0)
        second.hand_off()
    assert (nursery.report.completed, nursery.report.discarded) == (1, 2)


async def test_admission_from_worker_threads_is_exact() -> None:
    """Sync handlers admit tasks from worker threads; the limit must still hold."""
    gate = trio.Event()

    async def job() -> None:
        await gate.wait()

    async with trio_bg.open_background_nursery(max_running=10, max_pending=40) as nursery:
        collections = [RequestTasks(nursery, ordered=False) for _ in range(8)]

        def add_many(collection: RequestTasks) -> int:
            tasks = face_of(collection)
            refused = 0
            for _ in range(20):
                try:
                    tasks.add_task(job)
                except trio_bg.Overloaded:
                    refused += 1
            return refused

        async with trio.open_nursery() as threads:
            for collection in collections:
                threads.start_soon(trio.to_thread.run_sync, add_many, collection)
        assert nursery.stats.reserved == 50
        assert nursery.stats.rejected == 8 * 20 - 50
        for collection in collections:
            collection.hand_off()
        gate.set()
    assert nursery.report.completed == 50


async def test_pending_tasks_at_the_deadline_are_cancelled_without_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio_bg.open_background_nursery(max_running=1, grace_period=10) as nursery:
        for n in range(3):
            nursery.start_soon(slow, n)
        await trio.sleep(1)
        assert (nursery.stats.running, nursery.stats.pending) == (1, 2)
    assert (nursery.report.cancelled, nursery.report.unfinished) == (3, ("slow",) * 3)


# -- per-task options and events -------------------------------------------------------


async def test_a_task_that_outlives_its_timeout_is_timed_out(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    @trio_bg.task(name="slow-report", timeout=3)
    async def slow() -> None:
        await trio.sleep(5)

    @trio_bg.task(timeout=3)
    async def fast() -> None:
        await trio.sleep(1)

    async with trio_bg.open_background_nursery() as nursery:
        nursery.start_soon(slow)
        nursery.start_soon(fast)
        await nursery.wait_idle()
        assert_books_balance(nursery.stats)
    report = nursery.report
    assert (report.timed_out, report.completed, report.unfinished) == (1, 1, ())
    assert re.search(r"slow-report \[[0-9a-f]{32}\] timed out", caplog.text)
    assert_report_balances(report)


async def test_events_tell_each_step_with_waits_outcomes_and_durations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[trio_bg.TaskEvent] = []

    async with trio_bg.open_background_nursery(max_running=1, on_event=events.append) as n:
        n.start_soon(work, 2)
        n.start_soon(broken)
    by_kind = [(e.kind, e.name, e.outcome) for e in events]
    assert by_kind == [
        ("accepted", "work", None),
        ("accepted", "broken", None),
        ("started", "work", None),
        ("finished", "work", "completed"),
        ("started", "broken", None),
        ("finished", "broken", "failed"),
    ]
    assert events[3].duration == pytest.approx(2)
    assert events[4].waited == pytest.approx(2)


async def test_stats_show_the_oldest_pending_age_and_threads_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = threading.Event()
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def blocking() -> None:
        token.run_sync_soon(started.set)
        release.wait(10)

    async with trio_bg.open_background_nursery(max_running=1) as nursery:
        nursery.start_soon(blocking)
        await started.wait()
        nursery.start_soon(trio.sleep, 0)
        await trio.sleep(7)
        stats = nursery.stats
        release.set()
        await nursery.wait_idle()  # no deadline runs while a real thread finishes
    assert (stats.threads_in_use, stats.pending) == (1, 1)
    assert stats.oldest_pending_age == pytest.approx(7)
    assert nursery.report.completed == 2


async def test_cancel_ends_a_shutdown_during_its_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio_bg.open_background_nursery(grace_period=100) as nursery:
        nursery.start_soon(forever)
        async with trio.open_nursery() as waiter:
            waiter.start_soon(nursery.shutdown)
            await trio.sleep(3)
            nursery.cancel()  # as a second Ctrl-C does
    assert (nursery.report.cancelled, nursery.report.duration) == (1, pytest.approx(3))


async def test_start_soon_works_from_a_worker_thread() -> None:
    """A thread task may start a follow-up task; it runs in the thread's context."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str] = []

    async def follow_up() -> None:
        seen.append(request_id.get())

    async with trio_bg.open_background_nursery() as nursery:

        def in_a_thread() -> None:
            request_id.set("from-thread")
            nursery.start_soon(follow_up)

        await trio.to_thread.run_sync(in_a_thread)
        await nursery.wait_idle()
    assert seen == ["from-thread"]
    assert nursery.report.completed == 1


async def test_a_task_handed_off_after_the_cancel_is_cancelled_not_lost() -> None:
    """Past the grace period nothing starts any more; a late hand-off (a request that
    completed just then) is counted, not left waiting in the queue forever."""
    late_added = trio.Event()

    async def stubborn() -> None:
        # Ignores cancellation long enough for the late hand-off below.
        with trio.CancelScope(shield=True):
            await late_added.wait()

    async with trio_bg.open_background_nursery(max_running=1, grace_period=0) as nursery:
        nursery.start_soon(stubborn)
        late = RequestTasks(nursery, ordered=False)
        face_of(late).add_task(work, 1)  # admitted before the shutdown
        async with trio.open_nursery() as shutting_down:
            shutting_down.start_soon(nursery.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            late.hand_off()  # the slot is still taken, and the tasks are cancelled
            late_added.set()
    report = nursery.report
    assert (report.accepted, report.completed, report.cancelled) == (2, 1, 1)
    assert_report_balances(report)


# -- found in review -------------------------------------------------------------------


async def test_a_task_failing_while_cancelled_is_failed_and_the_nursery_lives(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio_bg.open_background_nursery(grace_period=1) as nursery:
        nursery.start_soon(task_with_a_cleanup_bug)
        nursery.start_soon(work, 0.5)
    report = nursery.report
    assert (report.failed, report.completed, report.cancelled) == (1, 1, 0)
    assert "cleanup failed" in caplog.text
    assert_report_balances(report)


async def test_a_keyboard_interrupt_in_a_task_is_counted_and_propagates() -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # after a shutdown: see test_reliability.py
        async with trio_bg.open_background_nursery() as nursery:
            nursery.start_soon(interrupted)
            await trio.sleep_forever()
    assert nursery.report.failed == 1


async def test_a_thread_task_reported_cancelled_never_runs_even_if_its_thread_is_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker thread may come up only after the grace period is over; the task is
    then reported cancelled, and must not run."""
    thread_may_go = threading.Event()

    def late_start(pool: ThreadPool) -> None:
        def late() -> None:
            thread_may_go.wait(5)
            pool._work()

        threading.Thread(target=late, daemon=True).start()

    monkeypatch.setattr(ThreadPool, "_start_thread", late_start)
    ran = threading.Event()
    async with trio_bg.open_background_nursery(grace_period=0) as nursery:
        nursery.start_soon(ran.set)
        await trio.testing.wait_all_tasks_blocked()
    thread_may_go.set()
    assert nursery.report.cancelled == 1
    # The late thread finds the task refused (bounded wait: it would set `ran` at once).
    assert not await trio.to_thread.run_sync(ran.wait, 0.5)


async def test_the_accepted_event_sees_balanced_books() -> None:
    seen: list[trio_bg.TaskStats] = []
    nursery: trio_bg.BackgroundNursery

    def look(event: trio_bg.TaskEvent) -> None:
        seen.append(nursery.stats)

    async with trio_bg.open_background_nursery(on_event=look) as nursery:
        nursery.start_soon(work, 0)
    for stats in seen:
        assert_books_balance(stats)


async def test_an_error_in_the_block_keeps_its_own_cause() -> None:
    class AppError(Exception):
        pass

    with pytest.raises(AppError) as raised:
        async with trio_bg.open_background_nursery():
            try:
                raise LookupError("db")
            except LookupError as db_error:
                raise AppError("lookup failed") from db_error
    assert isinstance(raised.value.__cause__, LookupError)
