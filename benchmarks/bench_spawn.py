"""3. Spawn throughput: ``BackgroundNursery.start_soon`` against a raw trio nursery's."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial

import trio

import trio_bg

from .inprocess import fresh_run
from .section import Section, Table, median, verdict

TARGET = 0.8


@dataclass(frozen=True, slots=True)
class SpawnRun:
    spawn: float
    """Seconds spent in the ``start_soon`` loop."""
    total: float
    """Seconds from the first ``start_soon`` until every task had returned."""
    ran: int


class Counter:
    def __init__(self) -> None:
        self.value = 0

    async def noop(self) -> None:
        self.value += 1


async def raw_trio(tasks: int) -> SpawnRun:
    counter = Counter()
    clock = time.perf_counter
    async with trio.open_nursery() as nursery:
        started = clock()
        for _ in range(tasks):
            nursery.start_soon(counter.noop)
        spawned = clock()
    return SpawnRun(spawned - started, clock() - started, counter.value)


async def background_nursery(tasks: int, *, max_running: int) -> SpawnRun:
    counter = Counter()
    clock = time.perf_counter
    async with trio_bg.open_background_nursery(max_running=max_running, max_pending=tasks) as bg:
        started = clock()
        for _ in range(tasks):
            bg.start_soon(counter.noop)
        spawned = clock()
        await bg.wait_idle()
        ended = clock()
    return SpawnRun(spawned - started, ended - started, counter.value)


Runner = Callable[[int], Awaitable[SpawnRun]]


def _rotated(
    variants: dict[str, Runner], tasks: int, reps: int, *, gc_paused: bool = False
) -> dict[str, list[SpawnRun]]:
    """Each variant once per rep, the order rotated from rep to rep."""
    names = list(variants)
    runs: dict[str, list[SpawnRun]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            runs[name].append(fresh_run(variants[name], tasks, gc_paused=gc_paused))
    return runs


def _ratio(raws: list[SpawnRun], runs: list[SpawnRun]) -> float:
    return median([raw.total / r.total for raw, r in zip(raws, runs, strict=True)])


def _rate(tasks: int, runs: list[SpawnRun], field: str) -> str:
    return f"{tasks / median([getattr(r, field) for r in runs]):,.0f}"


def run(*, reps: int, tasks: int) -> Section:
    """Rotate the variants within each rep; report medians of the per-rep ratios."""
    raw, like, queued = (
        "raw trio nursery",
        "BackgroundNursery, all running",
        "BackgroundNursery, 1,000 running, rest queued",
    )
    variants: dict[str, Runner] = {
        raw: raw_trio,
        like: partial(background_nursery, max_running=tasks),
        queued: partial(background_nursery, max_running=1_000),
    }
    for runner in variants.values():  # warm up every path
        fresh_run(runner, min(tasks, 10_000))
    runs = _rotated(variants, tasks, reps)
    paused = _rotated({raw: raw_trio, like: variants[like]}, tasks, reps, gc_paused=True)

    failures = [
        f"spawn: {name} ran {r.ran:,} of {tasks:,} tasks"
        for results in (runs, paused)
        for name, named_runs in results.items()
        for r in named_runs
        if r.ran != tasks
    ]
    table = Table(["", "start_soon, tasks/s", "spawn+run, tasks/s", "÷ raw", "target"])
    for name, results in runs.items():
        ratio = _ratio(runs[raw], results)
        target = verdict(ratio >= TARGET, f"≥ {TARGET}") if name == like else ""
        table.add(
            name,
            _rate(tasks, results, "spawn"),
            _rate(tasks, results, "total"),
            f"{ratio:.2f}",
            target,
        )
    table.add("diagnosis, cyclic GC paused during each run:")
    for name, results in paused.items():
        ratio = _ratio(paused[raw], results)
        table.add(
            f"  {name}",
            _rate(tasks, results, "spawn"),
            _rate(tasks, results, "total"),
            f"{ratio:.2f}",
        )
    return Section(
        title=f"3. Spawn throughput in-process: {tasks:,} no-op async tasks per rep, {reps} reps",
        table=table,
        notes=[
            "spawn+run: from the first start_soon until every task has returned; ÷ raw is the "
            "median of per-rep spawn+run ratios (higher is better). The target applies to the "
            "like-for-like row (every task started at once, as trio does)."
        ],
        failures=failures,
        data={
            "tasks": tasks,
            "runs": {name: [asdict(r) for r in results] for name, results in runs.items()},
            "runs_gc_paused": {
                name: [asdict(r) for r in results] for name, results in paused.items()
            },
        },
    )
