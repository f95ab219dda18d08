"""Retries of in-memory tasks: ``@trio_bg.task(retries=N, backoff=Backoff(...))``."""

from __future__ import annotations

import contextvars
import itertools
import logging
import math
import re
import threading
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing
from conftest import task_with_a_cleanup_bug

import trio_bg
from trio_bg import Backoff
from trio_bg._web.collection import RequestTasks, face_of
from trio_bg._web.middleware import Receive, Scope, Send
from trio_bg.testing import open_test_client

EXACT = Backoff(initial=10, jitter=0)  # retry n waits 10 * 2 ** (n - 1) seconds


def assert_books_balance(stats: trio_bg.TaskStats) -> None:
    assert stats.accepted == stats.pending + stats.running + stats.finished, stats
    assert 0 <= stats.retrying <= stats.pending, stats


class Watch:
    """An ``on_event`` hook that keeps every event and the stats seen with it."""

    def __init__(self) -> None:
        self.nursery: trio_bg.BackgroundNursery | None = None
        self.seen: list[tuple[trio_bg.TaskEvent, trio_bg.TaskStats]] = []

    def __call__(self, event: trio_bg.TaskEvent) -> None:
        assert self.nursery is not None
        self.seen.append((event, self.nursery.stats))

    @property
    def events(self) -> list[trio_bg.TaskEvent]:
        return [event for event, _ in self.seen]

    def assert_books_balanced_throughout(self) -> None:
        assert self.seen
        for _, stats in self.seen:
            assert_books_balance(stats)


# -- the backoff -----------------------------------------------------------------------


def test_the_default_backoff_doubles_from_one_second_up_to_a_minute() -> None:
    backoff = Backoff()
    assert (backoff.initial, backoff.factor, backoff.maximum, backoff.jitter) == (1, 2, 60, 0.1)
    longest = [backoff.delay(n, 0.0) for n in range(1, 9)]
    assert longest == [1, 2, 4, 8, 16, 32, 60, 60]
    shortest = [backoff.delay(n, 1.0) for n in range(1, 9)]  # a draw's bound: [0, 1)
    assert shortest == pytest.approx([0.9 * d for d in longest])


def test_full_jitter_and_no_jitter() -> None:
    assert Backoff(jitter=1).delay(3, 0.75) == pytest.approx(1)
    assert Backoff(initial=0.5, factor=3, jitter=0).delay(3, 0.99) == 4.5


def test_the_delay_stays_capped_however_many_retries() -> None:
    assert Backoff().delay(100_000, 0.0) == 60
    assert Backoff(initial=0.0, maximum=0.0).delay(100_000, 0.0) == 0
    assert Backoff(initial=1, factor=1, maximum=1).delay(100_000, 0.0) == 1


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"retries": -1}, ValueError, r"retries must be >= 0, not -1"),
        ({"retries": 1.5}, TypeError, r"retries must be an int, not 1\.5"),
        ({"retries": True}, TypeError, r"retries must be an int, not True"),
        ({"retries": "3"}, TypeError, r"retries must be an int, not '3'"),
        ({"retries": 2, "backoff": 0.5}, TypeError, r"backoff must be a trio_bg\.Backoff"),
        ({"retries": 2, "backoff": None}, TypeError, r"backoff must be a trio_bg\.Backoff"),
    ],
)
def test_bad_retries_are_refused_when_decorating(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        trio_bg.task(**options)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"initial": -1}, ValueError, r"initial must be finite and >= 0, not -1"),
        ({"initial": math.nan}, ValueError, r"initial must be finite"),
        ({"initial": "1"}, TypeError, r"initial must be a number, not '1'"),
        ({"factor": 0.5}, ValueError, r"factor must be finite and >= 1, not 0\.5"),
        ({"factor": True}, TypeError, r"factor must be a number, not True"),
        ({"maximum": 0.5}, ValueError, r"maximum must be finite and >= initial \(1\.0\)"),
        ({"maximum": math.inf}, ValueError, r"maximum must be finite"),
        ({"jitter": 1.5}, ValueError, r"jitter must be between 0 and 1, not 1\.5"),
        ({"jitter": -0.1}, ValueError, r"jitter must be between 0 and 1"),
    ],
)
def test_a_bad_backoff_is_refused(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Backoff(**options)


def test_a_backoff_is_a_small_frozen_value() -> None:
    backoff = Backoff(initial=0.5)
    with pytest.raises(AttributeError):
        backoff.initial = 2  # type: ignore[misc]
    assert backoff == Backoff(initial=0.5) and hash(backoff) == hash(Backoff(initial=0.5))
    assert "Backoff" in trio_bg.__all__


# -- retrying --------------------------------------------------------------------------


async def test_a_task_that_succeeds_on_its_third_attempt_is_completed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    starts: list[float] = []

    @trio_bg.task(retries=2)  # the default backoff: 1 s then 2 s, less up to 10 %
    async def flaky(secret: str) -> None:
        starts.append(trio.current_time())
        await trio.sleep(0.5)
        if len(starts) < 3:
            raise ConnectionError(f"attempt {len(starts)}")

    watch = Watch()
    async with trio_bg.open_background_nursery(on_event=watch) as watch.nursery:
        watch.nursery.start_soon(flaky, "hunter2")
        await watch.nursery.wait_idle()
        stats = watch.nursery.stats
    assert (stats.completed, stats.failed, stats.retried, stats.retrying) == (1, 0, 2, 0)
    assert watch.nursery.report.all_completed

    steps = [(e.kind, e.attempt, e.outcome) for e in watch.events]
    assert steps == [
        ("accepted", 1, None),
        ("started", 1, None),
        ("retrying", 1, "failed"),
        ("started", 2, None),
        ("retrying", 2, "failed"),
        ("started", 3, None),
        ("finished", 3, "completed"),
    ]
    delays = [e.delay or 0.0 for e in watch.events if e.kind == "retrying"]
    waits = [later - earlier - 0.5 for earlier, later in itertools.pairwise(starts)]
    assert delays == pytest.approx(waits)  # each retry started when its delay was over
    assert 0.9 <= delays[0] <= 1.0 and 1.8 <= delays[1] <= 2.0  # within the jitter
    assert all(e.duration == pytest.approx(0.5) for e in watch.events if e.kind == "retrying")
    watch.assert_books_balanced_throughout()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert re.search(
        r"flaky \[[0-9a-f]{32}\]: attempt 1 of 3 failed \(ConnectionError\('attempt 1'\)\); "
        r"retrying in",
        warnings[0],
    )
    assert "attempt 2 of 3" in warnings[1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "hunter2" not in caplog.text  # arguments are never logged


async def test_a_task_that_fails_every_attempt_is_failed_once_with_its_last_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[tuple[str, BaseException]] = []
    attempts = 0

    @trio_bg.task(name="charge", retries=2, backoff=EXACT)
    async def charge(secret: str) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError(f"no, {attempts}")

    watch = Watch()
    async with trio_bg.open_background_nursery(
        on_event=watch, on_error=lambda name, exc: errors.append((name, exc))
    ) as watch.nursery:
        handle = watch.nursery.start_soon(charge, "4111-1111")
        await watch.nursery.wait_idle()
        assert trio.current_time() == 30  # 10 s, then 20 s
    report = watch.nursery.report
    assert (report.failed, report.completed, report.cancelled) == (1, 0, 0)
    assert attempts == 3
    assert [(name, str(exc)) for name, exc in errors] == [("charge", "no, 3")]
    finished = [e for e in watch.events if e.kind == "finished"]
    assert [(e.outcome, e.attempt) for e in finished] == [("failed", 3)]
    assert [e.delay for e in watch.events if e.kind == "retrying"] == [10, 20]
    watch.assert_books_balanced_throughout()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        f"background task charge [{handle.id}] failed (attempt 3 of 3)"
    ]
    assert failures[0].exc_info is not None and str(failures[0].exc_info[1]) == "no, 3"
    assert "4111-1111" not in caplog.text


async def test_a_retry_waits_without_holding_a_running_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    order: list[tuple[str, float]] = []
    failed_once = False

    @trio_bg.task(retries=1, backoff=EXACT)
    async def flaky() -> None:
        nonlocal failed_once
        order.append(("flaky", trio.current_time()))
        if not failed_once:
            failed_once = True
            raise OSError

    async def other(name: str, seconds: float) -> None:
        order.append((name, trio.current_time()))
        await trio.sleep(seconds)

    async with trio_bg.open_background_nursery(max_running=1) as nursery:
        nursery.start_soon(flaky)
        nursery.start_soon(other, "during the backoff", 20)
        await trio.sleep(1)
        stats = nursery.stats
        assert (stats.running, stats.pending, stats.retrying) == (1, 1, 1)
        assert_books_balance(stats)
        await trio.sleep(11)  # the retry was due at 10; the slot is busy: it is queued
        nursery.start_soon(other, "accepted after the retry was due", 0)
        stats = nursery.stats
        assert (stats.running, stats.pending, stats.retrying) == (1, 2, 0)
        assert stats.oldest_pending_age == pytest.approx(2)
    assert order == [
        ("flaky", 0),
        ("during the backoff", 0),
        ("flaky", 20),  # in arrival order: due at 10, before the task accepted at 12
        ("accepted after the retry was due", 20),
    ]
    assert nursery.report.completed == 3


async def test_a_retry_that_is_due_runs_at_once_when_there_is_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    @trio_bg.task(retries=3, backoff=Backoff(initial=0.25, factor=3, jitter=0))
    async def flaky() -> None:
        starts.append(trio.current_time())
        if len(starts) < 4:
            raise RuntimeError

    async with trio_bg.open_background_nursery(max_running=1) as nursery:
        nursery.start_soon(flaky)
    assert starts == [0, 0.25, 1.0, 3.25]
    assert nursery.report.completed == 1


async def test_a_timeout_is_retried_like_a_failure(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = 0

    @trio_bg.task(name="sync-crm", timeout=3, retries=1, backoff=EXACT)
    async def sync_crm() -> None:
        nonlocal attempts
        attempts += 1
        await trio.sleep(5 if attempts == 1 else 1)  # each attempt has the full timeout

    @trio_bg.task(name="hangs", timeout=2, retries=1, backoff=EXACT)
    async def hangs() -> None:
        await trio.sleep_forever()

    watch = Watch()
    async with trio_bg.open_background_nursery(on_event=watch) as watch.nursery:
        watch.nursery.start_soon(sync_crm)
        watch.nursery.start_soon(hangs)
        await watch.nursery.wait_idle()
    report = watch.nursery.report
    assert (report.completed, report.timed_out, report.unfinished) == (1, 1, ())
    retrying = [(e.name, e.outcome, e.duration) for e in watch.events if e.kind == "retrying"]
    assert sorted(retrying) == [("hangs", "timed_out", 2), ("sync-crm", "timed_out", 3)]
    finished = {e.name: (e.outcome, e.attempt) for e in watch.events if e.kind == "finished"}
    assert finished == {"sync-crm": ("completed", 2), "hangs": ("timed_out", 2)}
    watch.assert_books_balanced_throughout()
    assert re.search(
        r"sync-crm \[[0-9a-f]{32}\]: attempt 1 of 2 timed out after 3s; retrying in 10s",
        caplog.text,
    )
    assert re.search(r"hangs \[[0-9a-f]{32}\] timed out after 2s \(attempt 2 of 2\)", caplog.text)


async def test_a_thread_task_is_retried_in_a_worker_thread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trio_thread = threading.get_ident()
    threads: list[bool] = []

    @trio_bg.task(retries=2, backoff=EXACT)
    def write_file() -> None:
        threads.append(threading.get_ident() != trio_thread)
        if len(threads) < 3:
            raise OSError("disk busy")

    watch = Watch()
    async with trio_bg.open_background_nursery(on_event=watch) as watch.nursery:
        watch.nursery.start_soon(write_file)
        await watch.nursery.wait_idle()
    assert threads == [True, True, True]
    report = watch.nursery.report
    assert (report.completed, report.failed) == (1, 0)
    assert [e.attempt for e in watch.events if e.kind == "started"] == [1, 2, 3]
    watch.assert_books_balanced_throughout()


async def test_a_timed_out_thread_tasks_retry_runs_at_once_in_a_replacement_thread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The abandoned first attempt still runs in the only worker thread; the pool
    replaces that thread (abandoned threads never starve it), so the retry runs at once,
    and times out in its turn."""
    release = threading.Event()
    calls: list[int] = []

    @trio_bg.task(timeout=1, retries=1, backoff=Backoff(initial=0, maximum=0))
    def stuck() -> None:
        calls.append(1)
        release.wait(10)

    try:
        async with trio_bg.open_background_nursery(thread_limit=1, grace_period=5) as nursery:
            nursery.start_soon(stuck)
            await nursery.wait_idle()
            assert nursery.stats.threads_in_use == 2  # both abandoned, both still running
    finally:
        release.set()
    report = nursery.report
    assert (report.timed_out, report.cancelled, report.abandoned) == (1, 0, 0)
    assert calls == [1, 1]


async def test_base_exceptions_are_never_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Fatal(BaseException):
        pass

    attempts = 0

    @trio_bg.task(retries=3)
    async def fatal() -> None:
        nonlocal attempts
        attempts += 1
        raise Fatal

    async with trio_bg.open_background_nursery() as nursery:
        nursery.start_soon(fatal)
    assert (nursery.report.failed, nursery.stats.retried, attempts) == (1, 0, 1)


async def test_a_keyboard_interrupt_is_not_retried_and_propagates() -> None:
    attempts = 0

    @trio_bg.task(retries=3)
    async def interrupted() -> None:
        nonlocal attempts
        attempts += 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        async with trio_bg.open_background_nursery() as nursery:
            nursery.start_soon(interrupted)
            await trio.sleep_forever()
    assert (nursery.report.failed, attempts) == (1, 1)


async def test_each_attempt_starts_from_the_callers_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str] = []

    @trio_bg.task(retries=1)
    async def flaky() -> None:
        seen.append(request_id.get())
        request_id.set("changed by the attempt")
        if len(seen) == 1:
            raise ValueError

    async with trio_bg.open_background_nursery() as nursery:
        request_id.set("r-1")
        nursery.start_soon(flaky)
        request_id.set("r-2")
    assert seen == ["r-1", "r-1"]


# -- shutting down ---------------------------------------------------------------------


async def test_a_task_waiting_for_its_retry_at_the_deadline_is_cancelled_and_never_rerun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0

    @trio_bg.task(name="webhook", retries=3, backoff=EXACT)
    async def webhook() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError

    watch = Watch()
    async with trio_bg.open_background_nursery(grace_period=5, on_event=watch) as watch.nursery:
        watch.nursery.start_soon(webhook)
        await trio.sleep(1)
    report = watch.nursery.report
    assert (report.cancelled, report.failed, report.unfinished) == (1, 0, ("webhook",))
    assert report.duration == pytest.approx(5)
    await trio.sleep(100)  # long past the retry it was waiting for
    assert attempts == 1
    assert [(e.kind, e.outcome, e.attempt) for e in watch.events][-1] == (
        "finished",
        "cancelled",
        2,
    )
    watch.assert_books_balanced_throughout()


async def test_cancel_during_a_backoff_cancels_the_waiting_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0

    @trio_bg.task(name="webhook", retries=3, backoff=EXACT)
    async def webhook() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError

    async with trio_bg.open_background_nursery(grace_period=100) as nursery:
        nursery.start_soon(webhook)
        async with trio.open_nursery() as waiter:
            waiter.start_soon(nursery.shutdown)
            await trio.sleep(3)
            assert nursery.stats.retrying == 1
            nursery.cancel()
    report = nursery.report
    assert (report.cancelled, report.unfinished, attempts) == (1, ("webhook",), 1)
    assert report.duration == pytest.approx(3)


async def test_the_drain_waits_for_a_retry_within_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A task that fails during the drain is retried, and the drain waits for it."""
    attempts = 0

    @trio_bg.task(retries=1, backoff=Backoff(initial=3, jitter=0))
    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        await trio.sleep(1)
        if attempts == 1:
            raise ConnectionError

    async with trio_bg.open_background_nursery(grace_period=10) as nursery:
        nursery.start_soon(flaky)
        await trio.sleep(0.5)  # the shutdown starts here; the first attempt fails at 1
    report = nursery.report
    assert (report.completed, report.cancelled, attempts) == (1, 0, 2)
    assert report.duration == pytest.approx(5 - 0.5)  # failed at 1, retried at 4, done at 5


async def task_that_turns_its_cancellation_into_an_error() -> None:
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        raise ValueError("not cancelled, failed") from None


@pytest.mark.parametrize(
    "func", [task_with_a_cleanup_bug, task_that_turns_its_cancellation_into_an_error]
)
async def test_a_task_failing_as_the_shutdown_cancels_it_is_failed_not_retried(
    autojump_clock: trio.testing.MockClock, func: Any
) -> None:
    errors: list[BaseException] = []
    async with trio_bg.open_background_nursery(
        grace_period=1, on_error=lambda name, exc: errors.append(exc)
    ) as nursery:
        nursery.start_soon(trio_bg.task(retries=3)(func))
    report = nursery.report
    assert (report.failed, report.cancelled, nursery.stats.retried) == (1, 0, 0)
    assert len(errors) == 1


async def test_the_books_balance_at_every_event_through_retries_and_a_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counts: Counter[str] = Counter()

    @trio_bg.task(retries=2, backoff=Backoff(initial=2))
    async def flaky(n: int) -> None:
        counts[f"flaky-{n}"] += 1
        await trio.sleep(n % 3)
        if counts[f"flaky-{n}"] < 2 + n % 2:
            raise ValueError

    @trio_bg.task(timeout=1, retries=1, backoff=Backoff(initial=1))
    async def slow() -> None:
        await trio.sleep(3)

    @trio_bg.task(name="thread_flaky", retries=5, backoff=Backoff(initial=4, jitter=0))
    def thread_flaky() -> None:  # retried at 4 and 12 at the soonest, then 16 s later
        raise OSError

    @trio_bg.task(name="endless", retries=1)
    async def endless() -> None:
        await trio.sleep_forever()

    watch = Watch()
    async with trio_bg.open_background_nursery(
        max_running=3, grace_period=12, on_event=watch
    ) as watch.nursery:
        for n in range(6):
            watch.nursery.start_soon(flaky, n)
        watch.nursery.start_soon(slow)
        watch.nursery.start_soon(thread_flaky)
        watch.nursery.start_soon(endless)
        await trio.sleep(3)
    watch.assert_books_balanced_throughout()
    finished = Counter(e.name for e in watch.events if e.kind == "finished")
    accepted = Counter(e.name for e in watch.events if e.kind == "accepted")
    assert finished == accepted  # "finished" exactly once per task
    kinds = Counter(e.kind for e in watch.events)
    assert kinds["retrying"] >= 8 and kinds["finished"] == 9
    report = watch.nursery.report
    assert report.accepted == 9
    assert report.accepted == (
        report.completed + report.failed + report.timed_out + report.cancelled + report.abandoned
    )
    assert {"endless", "thread_flaky"} <= set(report.unfinished)


# -- ordered chains, and the test kit --------------------------------------------------


async def test_an_ordered_requests_next_task_waits_for_the_final_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[tuple[str, float]] = []

    @trio_bg.task(retries=2, backoff=EXACT)
    async def flaky() -> None:
        starts.append(("flaky", trio.current_time()))
        if len(starts) < 3:
            raise ConnectionError

    async def after() -> None:
        starts.append(("after", trio.current_time()))

    async with trio_bg.open_background_nursery() as nursery:
        collection = RequestTasks(nursery, ordered=True, stop_on_failure=True)
        tasks = face_of(collection)
        tasks.add_task(flaky)
        tasks.add_task(after)
        collection.hand_off()
        await nursery.wait_idle()
    assert starts == [("flaky", 0), ("flaky", 10), ("flaky", 30), ("after", 30)]
    assert nursery.report.completed == 2


async def test_stop_on_failure_skips_the_rest_only_once_the_retries_are_exhausted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ran: list[str] = []

    @trio_bg.task(retries=1, backoff=EXACT)
    async def hopeless() -> None:
        ran.append("hopeless")
        raise ConnectionError

    async def never() -> None:
        ran.append("never")

    async with trio_bg.open_background_nursery() as nursery:
        collection = RequestTasks(nursery, ordered=True, stop_on_failure=True)
        tasks = face_of(collection)
        tasks.add_task(hopeless)
        tasks.add_task(never)
        collection.hand_off()
        await nursery.wait_idle()
    assert ran == ["hopeless", "hopeless"]
    assert (nursery.report.failed, nursery.report.cancelled) == (1, 1)


async def test_the_test_kit_fails_a_test_only_on_the_final_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0

    @trio_bg.task(retries=1)
    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("first attempt")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(flaky)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with open_test_client(trio_bg.BackgroundTaskMiddleware(app)) as client:
        await client.get("/")
        await client.drain()  # does not raise: the retry succeeded
        assert (client.stats.completed, client.stats.retried) == (1, 1)
