"""4. Memory: bytes per pending task (``max_running=1``) against a parked raw trio task."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Awaitable, Callable

import trio
import trio.testing

import trio_bg

from .section import Section, Table, median, verdict

TARGET = 1024
"""Bytes of overhead per pending task, beyond the call's own arguments."""

FIRST_ARG = 10**9
"""Arguments are distinct ints, made before measuring: only their references count."""


async def work(value: int, gate: trio.Event) -> None:
    await gate.wait()


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def pending_in_background_nursery(tasks: int) -> float:
    """Bytes per task while ``tasks`` wait, one running ahead of them."""
    values = list(range(FIRST_ARG, FIRST_ARG + tasks))
    gate = trio.Event()
    async with trio_bg.open_background_nursery(
        max_running=1, max_pending=tasks, grace_period=0
    ) as bg:
        bg.start_soon(work, 0, gate)  # takes the one running slot
        await trio.testing.wait_all_tasks_blocked()
        before = _traced()
        for value in values:
            bg.start_soon(work, value, gate)
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        pending = bg.stats.pending
        bg.cancel()
    if pending != tasks:
        raise RuntimeError(f"{pending:,} tasks pending, expected {tasks:,}")
    return (after - before) / tasks


async def parked_in_raw_trio(tasks: int) -> float:
    """Bytes per task for ``tasks`` raw trio tasks started and parked on an event."""
    values = list(range(FIRST_ARG, FIRST_ARG + tasks))
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        before = _traced()
        for value in values:
            nursery.start_soon(work, value, gate)
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        nursery.cancel_scope.cancel()
    return (after - before) / tasks


def traced(measure: Callable[[int], Awaitable[float]], tasks: int) -> float:
    """``measure(tasks)`` in a fresh trio run, with tracemalloc on."""
    gc.collect()
    tracemalloc.start()
    try:
        return trio.run(measure, tasks)
    finally:
        tracemalloc.stop()


def run(*, reps: int, tasks: int) -> Section:
    title = f"4. Memory per pending task, {tasks:,} pending (tracemalloc)"
    try:
        pending = [traced(pending_in_background_nursery, tasks) for _ in range(reps)]
    except TypeError as error:
        if "unknown option" not in str(error):
            raise
        return Section(title=title, notes=["skipped: max_running not available"])
    parked = [traced(parked_in_raw_trio, tasks) for _ in range(reps)]

    # What the call itself needs however it is stored: its positional arguments'
    # tuple and its keyword arguments' dict (the function and the int are shared).
    call = sys.getsizeof((FIRST_ARG, None)) + sys.getsizeof({})
    bg_bytes, trio_bytes = median(pending), median(parked)
    table = Table(["", "bytes/task", "of which the call", "overhead", "target"])
    table.add(
        "BackgroundNursery, pending (max_running=1)",
        f"{bg_bytes:,.0f}",
        f"{call}",
        f"{bg_bytes - call:,.0f}",
        verdict(bg_bytes - call <= TARGET, f"≤ {TARGET}"),
    )
    table.add("raw trio task, parked on an event", f"{trio_bytes:,.0f}", f"{call}")
    table.add("  pending ÷ parked raw trio task", f"{bg_bytes / trio_bytes:.2f}", "", "")
    return Section(
        title=title,
        table=table,
        notes=[
            f"the call is work(value, gate): its args tuple and kwargs dict, {call} bytes; "
            f"overhead is the rest. Median of {reps} measurement(s); tracemalloc counts "
            "are deterministic to a few bytes."
        ],
        data={"tasks": tasks, "pending_bytes": pending, "parked_bytes": parked, "call": call},
    )
