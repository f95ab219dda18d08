"""9. Task handles: the memory an ended task's status takes while it is kept, and how
fast `task_status` answers, from memory and from the journal, while tasks run."""

from __future__ import annotations

import gc
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio
import trio.testing

import trio_bg

from .bench_memory import traced
from .section import Section, Table, median, verdict

MEMORY_TARGET = 300
"""Bytes an ended task's status may take in memory (the issue's aim), its result aside."""


async def noop() -> None:
    pass


@trio_bg.task(name="benchmarks.handles.durable", durable=True)
async def durable_noop(n: int) -> None:
    pass


async def _ended_status_bytes(tasks: int) -> float:
    """Bytes per ended task's status, kept (``statuses_kept=tasks``)."""
    async with trio_bg.open_background_nursery(statuses_kept=tasks, max_pending=tasks) as bg:
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(tasks):
            bg.start_soon(noop)
            if i % 1000 == 999:
                await bg.wait_idle()
        await bg.wait_idle()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        kept = len(await bg.list_tasks(limit=tasks))
    if kept != tasks:
        raise RuntimeError(f"{kept:,} statuses kept, expected {tasks:,}")
    return (after - before) / tasks


async def _lookups_in_memory(lookups: int, kept: int) -> tuple[float, float]:
    """µs per `task_status` of a kept ended task, idle and with tasks streaming in."""
    # Room for the statuses of the tasks the load adds, so that the looked-up ones stay.
    room = kept + 2 * lookups
    async with trio_bg.open_background_nursery(statuses_kept=room, max_pending=room) as bg:
        ids = [bg.start_soon(noop).id for _ in range(kept)]
        await bg.wait_idle()
        idle = await _time_lookups(bg, ids, lookups)
        busy = await _time_lookups_under_load(bg, ids, lookups)
    return idle, busy


async def _time_lookups(bg: trio_bg.BackgroundNursery, ids: list[str], lookups: int) -> float:
    picks = random.Random(1).choices(ids, k=lookups)
    started = time.perf_counter()
    for task_id in picks:
        if await bg.task_status(task_id) is None:
            raise RuntimeError("a kept status was not found")
    return (time.perf_counter() - started) / lookups * 1e6


async def _time_lookups_under_load(
    bg: trio_bg.BackgroundNursery, ids: list[str], lookups: int
) -> float:
    """The same lookups while another trio task adds a task at every checkpoint."""
    result: list[float] = []
    async with trio.open_nursery() as load:

        async def add_tasks() -> None:
            for _ in range(lookups):  # (about one a lookup: each lookup is a checkpoint)
                bg.start_soon(noop)
                await trio.lowlevel.checkpoint()

        load.start_soon(add_tasks)
        result.append(await _time_lookups(bg, ids, lookups))
        load.cancel_scope.cancel()
    return result[0]


async def _lookups_in_journal(lookups: int, rows: int, directory: Path) -> float:
    """µs per `task_status` of a task that only the journal knows (another process's
    deferred row): a read through the journal's thread."""
    path = directory / "handles.db"
    async with trio_bg.open_background_nursery(journal=path, grace_period=0) as bg:
        ids = [bg.start_soon(durable_noop, n).id for n in range(rows)]
        bg.cancel()  # deferred: they stay in the journal, nobody's
    # Another nursery: it claims the rows into memory at once, unless it cannot run
    # them; a tiny max_running keeps all but a few in the journal alone.
    async with trio_bg.open_background_nursery(
        journal=path, max_running=1, max_pending=0, grace_period=0
    ) as other:
        picks = random.Random(2).choices(ids, k=lookups)
        started = time.perf_counter()
        for task_id in picks:
            if await other.task_status(task_id) is None:
                raise RuntimeError("a journal row was not found")
        elapsed = time.perf_counter() - started
        other.cancel()
    return elapsed / lookups * 1e6


def run(*, reps: int, tasks: int) -> Section:
    title = f"9. Task handles: a kept status's memory ({tasks:,} tasks), task_status lookups"
    memory = [traced(_ended_status_bytes, tasks) for _ in range(max(1, min(reps, 3)))]
    lookups = 20_000
    idle, busy, journal = [], [], []
    for _ in range(reps):
        in_memory = trio.run(_lookups_in_memory, lookups, 10_000)
        idle.append(in_memory[0])
        busy.append(in_memory[1])
        with tempfile.TemporaryDirectory() as directory:
            journal.append(trio.run(_lookups_in_journal, 2_000, 1_000, Path(directory)))
    per_status = median(memory)
    table = Table(["", "value", "target"])
    table.add(
        "memory per ended status kept (bytes)",
        f"{per_status:,.0f}",
        verdict(per_status <= MEMORY_TARGET, f"≤ {MEMORY_TARGET}"),
    )
    table.add("task_status from memory, idle (µs)", f"{median(idle):.2f}", "")
    table.add("task_status from memory, tasks streaming in (µs)", f"{median(busy):.2f}", "")
    table.add("task_status from the journal (µs)", f"{median(journal):.0f}", "")
    table.add("  journal ÷ memory (times slower)", f"{median(journal) / median(idle):.0f}", "")
    return Section(
        title=title,
        table=table,
        notes=[
            "memory: tracemalloc's growth over tasks that ended and are kept "
            "(statuses_kept = the task count), divided by the count: the record, its id "
            "and times, the dict and deque entries. A result would add its JSON text.",
            "lookups: 20,000 task_status calls of random kept ids, µs each (the journal: "
            "2,000 of a 1,000-row journal's deferred rows, another nursery asking), each "
            "a checkpoint. Under load: another trio task adds a task at every checkpoint.",
        ],
        data={"memory": memory, "idle_us": idle, "busy_us": busy, "journal_us": journal},
    )
