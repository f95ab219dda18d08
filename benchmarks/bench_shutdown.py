"""5. Shutdown: cancelling 10,000 running tasks, against trio cancelling as many."""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio
import trio.testing

import trio_bg

from .inprocess import fresh_run
from .section import Section, Table, median, verdict

TARGET = 1.2
"""trio_bg's time from the grace deadline to the report, at most this times trio's."""


@dataclass(frozen=True, slots=True)
class ShutdownRun:
    seconds: float
    cancelled: int


async def forever() -> None:
    await trio.sleep_forever()


async def background_nursery(tasks: int) -> ShutdownRun:
    """``shutdown()`` with ``grace_period=0``: the deadline is at once; time to the report."""
    async with trio_bg.open_background_nursery(
        grace_period=0, max_running=tasks, max_pending=0
    ) as bg:
        for _ in range(tasks):
            bg.start_soon(forever)
        await trio.testing.wait_all_tasks_blocked()
        started = time.perf_counter()
        report = await bg.shutdown()
        seconds = time.perf_counter() - started
    return ShutdownRun(seconds, report.cancelled)


async def raw_trio(tasks: int) -> ShutdownRun:
    """Cancel a raw nursery's parked tasks; time until the nursery has exited."""
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(forever)
        await trio.testing.wait_all_tasks_blocked()
        started = time.perf_counter()
        nursery.cancel_scope.cancel()
    seconds = time.perf_counter() - started
    return ShutdownRun(seconds, tasks)


def _paired(tasks: int, reps: int, *, gc_paused: bool) -> tuple[list[ShutdownRun], ...]:
    """(raw, trio_bg) runs, alternating which goes first."""
    raws: list[ShutdownRun] = []
    bgs: list[ShutdownRun] = []
    for rep in range(reps):
        order = [(raw_trio, raws), (background_nursery, bgs)]
        for measure, results in order if rep % 2 == 0 else order[::-1]:
            results.append(fresh_run(measure, tasks, gc_paused=gc_paused))
    return raws, bgs


def _ms(runs: list[ShutdownRun]) -> str:
    return f"{median([r.seconds for r in runs]) * 1e3:.1f}"


def _ratio(raws: list[ShutdownRun], bgs: list[ShutdownRun]) -> float:
    return median([bg.seconds / raw.seconds for raw, bg in zip(raws, bgs, strict=True)])


def run(*, reps: int, tasks: int) -> Section:
    fresh_run(raw_trio, tasks)  # warm up both paths
    fresh_run(background_nursery, tasks)
    raws, bgs = _paired(tasks, reps, gc_paused=False)
    raws_no_gc, bgs_no_gc = _paired(tasks, reps, gc_paused=True)

    failures = [
        f"shutdown: the report counts {r.cancelled:,} cancelled of {tasks:,}"
        for r in [*bgs, *bgs_no_gc]
        if r.cancelled != tasks
    ]
    ratio = _ratio(raws, bgs)
    table = Table(["", "ms to cancel all", "÷ raw", "target"])
    table.add("raw trio nursery", _ms(raws), "1.00")
    table.add(
        "BackgroundNursery.shutdown() → report",
        _ms(bgs),
        f"{ratio:.2f}",
        verdict(ratio <= TARGET, f"≤ {TARGET}"),
    )
    table.add("diagnosis, cyclic GC paused during each run:")
    table.add("  raw trio nursery", _ms(raws_no_gc), "1.00")
    table.add(
        "  BackgroundNursery.shutdown() → report",
        _ms(bgs_no_gc),
        f"{_ratio(raws_no_gc, bgs_no_gc):.2f}",
    )
    return Section(
        title=f"5. Shutdown: {tasks:,} running tasks (trio.sleep_forever), grace_period=0, "
        f"{reps} reps",
        table=table,
        notes=[
            "÷ raw is the median of per-rep ratios (lower is better); trio_bg's time includes "
            "building and logging the report (to a discarding handler). The GC-paused rows "
            "show how much of the gap is the cyclic collector walking a bigger heap while "
            "cancellation allocates.",
        ],
        failures=failures,
        data={
            "tasks": tasks,
            "raw_seconds": [r.seconds for r in raws],
            "trio_bg_seconds": [r.seconds for r in bgs],
            "raw_seconds_gc_paused": [r.seconds for r in raws_no_gc],
            "trio_bg_seconds_gc_paused": [r.seconds for r in bgs_no_gc],
        },
    )
