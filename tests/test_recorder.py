"""The task recorder behind the dashboard and the metrics: nothing is recorded until one
asks for it; then every task's outcome, run time and wait, by name."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

import trio_bg
from trio_bg._engine.recorder import BUCKETS, Histogram, TaskRecorder
from trio_bg._running.nursery import record_tasks


async def test_nothing_is_recorded_until_a_recorder_is_asked_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def nap(seconds: float) -> None:
        await trio.sleep(seconds)

    async def broken() -> None:
        raise ValueError("no")

    async with trio_bg.open_background_nursery(max_running=1) as bg:
        bg.start_soon(nap, 1)
        await bg.wait_idle()
        recorder = record_tasks(bg)
        assert record_tasks(bg) is recorder  # one per nursery
        assert recorder.by_name == {}  # the task before it: not recorded
        bg.start_soon(nap, 2)
        bg.start_soon(nap, 0.5)  # waits 2 s for the one running slot
        bg.start_soon(broken)
        await bg.wait_idle()
    naps = recorder.by_name[nap.__qualname__]
    assert naps.outcomes == {"completed": 2}
    assert sorted(naps.durations.recent) == pytest.approx([0.5, 2])
    assert sorted(naps.waits.recent) == pytest.approx([0, 2])
    assert recorder.by_name[broken.__qualname__].outcomes == {"failed": 1}
    snapshot = recorder.snapshot()
    assert snapshot["names"][nap.__qualname__]["durations"]["sum"] == pytest.approx(2.5)
    assert sum(point["outcomes"].get("completed", 0) for point in snapshot["timeline"]) == 2


def test_a_histogram_counts_in_buckets_and_gives_percentiles() -> None:
    histogram = Histogram()
    assert histogram.percentiles(0.5) == [None]
    for seconds in (0.001, 0.2, 0.2, 7.0, 1_000.0, -1.0):  # (a clock step back counts as 0)
        histogram.observe(seconds)
    assert histogram.count == 6 and histogram.total == pytest.approx(1_007.401)
    cumulative = dict(histogram.cumulative())
    assert (cumulative[0.005], cumulative[0.25], cumulative[10.0], cumulative[math.inf]) == (
        2,
        4,
        5,
        6,
    )
    assert histogram.percentiles(0.5, 0.99) == [0.2, 1_000.0]
    assert BUCKETS[-1] == math.inf and list(BUCKETS) == sorted(BUCKETS)


def test_the_timeline_keeps_ten_minutes_in_five_second_steps() -> None:
    recorder = TaskRecorder()
    recorder.finished("a", "completed", 0.1)
    recorder.finished("a", "failed", None)  # never ran: counted, no duration
    [(at, counts)] = recorder.timeline
    assert at % 5 == 0 and counts == {"completed": 1, "failed": 1}
    assert recorder.by_name["a"].durations.count == 1


async def test_a_task_added_before_the_recorder_is_counted_at_its_end_untimed() -> None:
    gate = trio.Event()

    async def waits() -> None:
        await gate.wait()

    async with trio_bg.open_background_nursery() as bg:
        bg.start_soon(waits)
        await trio.testing.wait_all_tasks_blocked()
        recorder = record_tasks(bg)
        gate.set()
        await bg.wait_idle()
    record = recorder.by_name[waits.__qualname__]
    assert record.outcomes == {"completed": 1} and record.durations.count == 0
