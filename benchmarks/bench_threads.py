"""7. Plain-function tasks: the nursery's own worker threads.

(a) HTTP: the raw app of benchmark 1 adding one plain function per request (a 10 ms
blocking ``time.sleep``, run in one of the nursery's worker threads), and one adding
an async no-op task, against the bare app, at 32 and at 50 wrk connections; with the
server's CPU per request, from which the CPU each kind of task adds. (b) In-process:
100,000 plain-function no-op tasks through a `BackgroundNursery`, against a raw trio
nursery calling ``trio.to_thread.run_sync`` with a limiter of the same size.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial

import trio

import trio_bg
from trio_bg._running.options import DEFAULT_MAX_RUNNING, DEFAULT_THREAD_LIMIT

from .bench_http import BARE, App, HttpSettings, Matrix, Measurement, measure, tasks_cell
from .inprocess import fresh_run
from .section import Section, Table, median, verdict

CONNECTIONS = (32, 50)
"""wrk connections of (a): the other HTTP benchmarks' 32, and more than the 40 threads."""
THREAD_TARGET = 0.80
"""req/s with a 10 ms blocking plain-function task per request ÷ the bare app's."""
ASYNC_TARGET = 0.95
"""req/s with an async no-op task per request ÷ the bare app's (benchmark 1's target)."""
CPU_TARGET = 2.0
"""Server CPU a plain-function task adds ÷ the CPU an async no-op task adds, at most."""
INPROCESS_TARGET = 2.0
"""Plain-function tasks/s through the nursery ÷ trio.to_thread.run_sync's, at least."""
TASK_TIMEOUT = 10.0
"""The timeout (s) of the reference row's ``@trio_bg.task``: never reached."""

ASYNC = App("raw+trio_bg", "noop", "trio_bg + 1 async no-op task")
BLOCK = App("raw+trio_bg", "block", "trio_bg + 1 plain function (10 ms time.sleep)")
TO_THREAD = App("raw+nursery", "block", "  ref: raw trio nursery, trio.to_thread.run_sync")
FLOOR = App("raw+threads", "block", "  ref: 40 plain threads on a queue, trio never told")
HTTP_APPS = (BARE, ASYNC, BLOCK, TO_THREAD, FLOOR)


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"  {text}".ljust(60), end="\r", file=sys.stderr)


# -- (a) HTTP -------------------------------------------------------------------------


def run_http(settings: HttpSettings) -> dict[int, Matrix]:
    """Every (connections, app) pair once per rep, in an order rotated from rep to rep
    (the connection counts interleaved too); one `Matrix` per connection count."""
    pairs = [(connections, app) for connections in CONNECTIONS for app in HTTP_APPS]
    matrices = {connections: Matrix(list(HTTP_APPS)) for connections in CONNECTIONS}
    for rep in range(settings.reps):
        _progress(f"threads, HTTP: rep {rep + 1}/{settings.reps}")
        for matrix in matrices.values():
            matrix.reps.append({})
        shift = rep % len(pairs)
        for connections, app in pairs[shift:] + pairs[:shift]:
            at = dataclasses.replace(settings, connections=connections)
            matrices[connections].reps[rep][app] = measure(app, rep, at)
    _progress("")
    return matrices


def _cpu(m: Measurement) -> tuple[float, float] | None:
    """µs of server CPU per request: (trio's thread, the process's other threads)."""
    main, process = m.cpu_per_request("cpu_trio_us"), m.cpu_per_request("cpu_process_us")
    if main is None or process is None:
        return None
    return main, process - main


def _total_cpu(m: Measurement) -> float | None:
    cpu = _cpu(m)
    return None if cpu is None else cpu[0] + cpu[1]


def added_cpu(matrix: Matrix, app: App) -> list[float]:
    """Per rep: ``app``'s server CPU µs per request less the bare app's, same rep: what
    its task (and the middleware) adds per request."""
    added = []
    for rep in matrix.reps:
        mine, bare = _total_cpu(rep[app]), _total_cpu(rep[BARE])
        if mine is not None and bare is not None:
            added.append(mine - bare)
    return added


def cpu_ratio(matrix: Matrix, app: App = BLOCK) -> tuple[float, float]:
    """(median of per-rep ratios, ratio of the medians) of the CPU ``app``'s plain-function
    task adds per request ÷ the CPU trio_bg's async no-op task adds."""
    threads, asyncs = added_cpu(matrix, app), added_cpu(matrix, ASYNC)
    per_rep = [t / a for t, a in zip(threads, asyncs, strict=True) if a > 0]
    of_medians = median(threads) / median(asyncs) if asyncs and median(asyncs) > 0 else float("nan")
    return median(per_rep), of_medians


def _http_row(matrix: Matrix, app: App, connections: int) -> list[str]:
    runs = [m for m in matrix.runs(app) if m.load is not None]
    if not runs:
        return [app.label, str(connections), "failed"]
    loads = [m.load for m in runs if m.load is not None]
    cpus = [cpu for m in runs if (cpu := _cpu(m)) is not None]
    ratio = matrix.ratio(app, BARE)
    target = {BLOCK: THREAD_TARGET, ASYNC: ASYNC_TARGET}.get(app)
    return [
        app.label,
        str(connections),
        f"{median([r.rps for r in loads]):,.0f}",
        f"{median([r.p50_ms for r in loads]):.1f}",
        f"{median([r.p99_ms for r in loads]):.1f}",
        "1.000" if app == BARE else f"{ratio:.3f}",
        f"{median([c[0] for c in cpus]):.0f}" if cpus else "?",
        f"{median([c[1] for c in cpus]):.0f}" if cpus else "?",
        "" if app == BARE else f"{median(added_cpu(matrix, app)):+.0f}",
        f"{median([m.settle for m in runs]) * 1000:.0f}",
        tasks_cell(app, runs),
        "" if target is None else verdict(ratio >= target, f"≥ {target}"),
    ]


def http(settings: HttpSettings) -> Section:
    """(a) req/s, latency and server CPU with one plain-function task per request."""
    matrices = run_http(settings)
    table = Table(
        [
            "raw ASGI app, one task per request",
            "conns",
            "req/s",
            "p50 ms",
            "p99 ms",
            "÷ bare",
            "CPU µs/req, trio",
            "other threads",
            "+CPU µs/req",
            "settled ms",
            "tasks completed",
            "target",
        ]
    )
    ratios: dict[int, tuple[float, float]] = {}
    for connections, matrix in matrices.items():
        for app in HTTP_APPS:
            table.add(*_http_row(matrix, app, connections))
        ratios[connections] = per_rep, of_medians = cpu_ratio(matrix)
        floor_per_rep, floor_of_medians = cpu_ratio(matrix, FLOOR)
        blank = [""] * 6
        table.add(
            "    +CPU, trio_bg plain function ÷ async no-op",
            str(connections),
            *blank,
            f"{per_rep:.2f}",
            "",
            f"(of medians {of_medians:.2f})",
            verdict(per_rep <= CPU_TARGET, f"≤ {CPU_TARGET}"),
        )
        table.add(
            "    +CPU, ref: 40 plain threads ÷ trio_bg async no-op",
            str(connections),
            *blank,
            f"{floor_per_rep:.2f}",
            "",
            f"(of medians {floor_of_medians:.2f})",
        )
    failures = [
        f"{connections} connections: {problem}"
        for connections, matrix in matrices.items()
        for problem in matrix.failures()
    ]
    return Section(
        title=f"7a. Plain-function tasks over HTTP: raw ASGI app, {settings.reps} reps x "
        f"{settings.duration} s, at {' and '.join(map(str, CONNECTIONS))} connections",
        table=table,
        notes=[
            "÷ bare: median of per-rep req/s ratios against the bare app at the same connection "
            "count (same rep; higher is better). Every (connections, app) pair runs once per "
            "rep, in an order rotated from rep to rep. The plain function blocks its worker "
            f"thread in time.sleep(0.01); the nursery runs it in one of its own threads "
            f"(thread_limit {DEFAULT_THREAD_LIMIT}, the default).",
            "CPU µs/req: the server's CPU time per request answered, from just before the load "
            "until its tasks had run (the app reports it on /count): its trio thread, and its "
            "other threads (the nursery's workers). The whole server is pinned to one core. "
            "+CPU µs/req: median of per-rep differences from the bare app's total (trio + "
            "other), i.e. what the middleware and one task add per request. The ÷ row: "
            "median of per-rep ratios of those differences, plain function ÷ async no-op "
            "(in brackets: the ratio of their medians); lower is better. The async no-op's "
            "+CPU is small (tens of µs) and moves by tens of per cent from run to run: the ÷ rows "
            "are noisy; read them next to each other.",
            "The reference rows have no middleware. to_thread: a trio nursery the lifespan owns "
            "starts trio.to_thread.run_sync(task) after each response (trio's default limiter, "
            "40): one trio task and one hop each way per call, the design trio_bg had before "
            "its own pool. 40 plain threads: the response done, the function is put on a "
            "queue.SimpleQueue that 40 threads (started with the lifespan) take calls from; "
            "trio is never told: no bookkeeping at all, the floor for running a plain function "
            "in a thread of this process, its cost being the threads' and the GIL's hand-offs "
            "on the one core.",
            "settled ms: median time from the end of the load until every task added had run "
            "(how far the background work lagged behind the requests).",
            "tasks completed: as in benchmark 1.",
        ],
        failures=failures,
        data={
            str(connections): {
                "measurements": matrix.as_data(),
                "added_cpu_us": {
                    app.label: added_cpu(matrix, app) for app in HTTP_APPS if app != BARE
                },
                "cpu_ratio_per_rep_median": ratios[connections][0],
                "cpu_ratio_of_medians": ratios[connections][1],
            }
            for connections, matrix in matrices.items()
        },
    )


# -- (b) in-process ------------------------------------------------------------------


class _Ran:
    """Counts the tasks that ran, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def one(self) -> None:
        with self._lock:
            self.value += 1


RAN = _Ran()


def noop() -> None:
    """The plain-function no-op task."""
    RAN.one()


@trio_bg.task(timeout=TASK_TIMEOUT)
def timed_noop() -> None:
    """The same, with a timeout: the path that arms a deadline once a thread started it."""
    RAN.one()


async def async_noop() -> None:
    """An async no-op task, for contrast."""
    RAN.one()


@dataclass(frozen=True, slots=True)
class ThreadRun:
    seconds: float
    """From the first task started until every task had returned."""
    cpu_trio: float
    """CPU seconds of trio's thread meanwhile."""
    cpu_other: float
    """CPU seconds of the process's other threads meanwhile (the worker threads)."""
    ran: int


class _Clock:
    def __init__(self) -> None:
        self.cpu, self.process, self.wall = (
            time.thread_time(),
            time.process_time(),
            time.perf_counter(),
        )

    def stop(self) -> ThreadRun:
        wall, cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu
        return ThreadRun(wall, cpu, time.process_time() - self.process - cpu, RAN.value)


async def raw_to_thread(tasks: int) -> ThreadRun:
    """A raw trio nursery: one trio task per call, each ``trio.to_thread.run_sync``
    with one `trio.CapacityLimiter` of the nursery's thread limit for them all."""
    RAN.value = 0
    limiter = trio.CapacityLimiter(DEFAULT_THREAD_LIMIT)
    call = partial(trio.to_thread.run_sync, noop, limiter=limiter)
    async with trio.open_nursery() as nursery:
        clock = _Clock()
        for _ in range(tasks):
            nursery.start_soon(call)
    return clock.stop()


async def background_nursery(tasks: int, *, func: Callable[[], object]) -> ThreadRun:
    """``open_background_nursery(max_pending=tasks)`` (the default ``max_running`` and
    ``thread_limit``): ``start_soon`` each task, then ``wait_idle``."""
    RAN.value = 0
    async with trio_bg.open_background_nursery(max_pending=tasks) as bg:
        clock = _Clock()
        for _ in range(tasks):
            bg.start_soon(func)
        await bg.wait_idle()
        return clock.stop()


RAW = f"raw trio nursery, trio.to_thread.run_sync, CapacityLimiter({DEFAULT_THREAD_LIMIT})"
PLAIN = "BackgroundNursery, plain function"
TIMED = f"BackgroundNursery, plain function, @trio_bg.task(timeout={TASK_TIMEOUT:g})"
ASYNC_ROW = "BackgroundNursery, async no-op task (for contrast)"


def _variants() -> dict[str, Callable[[int], Awaitable[ThreadRun]]]:
    return {
        RAW: raw_to_thread,
        PLAIN: partial(background_nursery, func=noop),
        TIMED: partial(background_nursery, func=timed_noop),
        ASYNC_ROW: partial(background_nursery, func=async_noop),
    }


def throughput(*, reps: int, tasks: int) -> Section:
    """(b) plain-function tasks per second in-process ÷ trio.to_thread.run_sync's."""
    variants = _variants()
    names = list(variants)
    for runner in variants.values():  # warm up every path (and trio's thread cache)
        fresh_run(runner, min(tasks, 10_000))
    runs: dict[str, list[ThreadRun]] = {name: [] for name in names}
    for rep in range(reps):
        _progress(f"threads, in-process: rep {rep + 1}/{reps}")
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(fresh_run(variants[name], tasks))
    _progress("")

    failures = [
        f"threads in-process: {name} ran {r.ran:,} of {tasks:,} tasks"
        for name, named_runs in runs.items()
        for r in named_runs
        if r.ran != tasks
    ]
    table = Table(["", "tasks/s", "÷ raw", "CPU µs/task, trio thread", "other threads", "target"])
    for name, results in runs.items():
        ratio = median([raw.seconds / r.seconds for raw, r in zip(runs[RAW], results, strict=True)])
        table.add(
            name,
            f"{tasks / median([r.seconds for r in results]):,.0f}",
            f"{ratio:.2f}",
            f"{median([r.cpu_trio for r in results]) / tasks * 1e6:.1f}",
            f"{median([r.cpu_other for r in results]) / tasks * 1e6:.1f}",
            verdict(ratio >= INPROCESS_TARGET, f"≥ {INPROCESS_TARGET}") if name == PLAIN else "",
        )
    return Section(
        title=f"7b. Plain-function tasks in-process: {tasks:,} no-op tasks per run, {reps} reps, "
        "one core",
        table=table,
        notes=[
            "tasks/s: from the first start_soon until every task had returned (the raw nursery's "
            "block left; the BackgroundNursery's wait_idle() returned). ÷ raw: median of per-rep "
            "ratios against the first row (higher is better). The raw row starts every task at "
            "once, each waiting for one of the limiter's "
            f"{DEFAULT_THREAD_LIMIT} tokens and then for trio's thread cache; the "
            f"BackgroundNursery (open_background_nursery(max_pending={tasks:,}), default "
            f"max_running {DEFAULT_MAX_RUNNING:,} and thread_limit {DEFAULT_THREAD_LIMIT}) runs "
            "them in its own worker threads, started with the nursery (their start is in the "
            "time), which take the next task themselves and tell trio in batches.",
            "CPU: trio's thread, and the process's other threads (the worker threads) meanwhile; "
            "everything runs pinned to one core, so the threads' CPU is taken from trio's.",
        ],
        failures=failures,
        data={
            "tasks": tasks,
            "runs": {name: [asdict(r) for r in results] for name, results in runs.items()},
        },
    )


def run(settings: HttpSettings, *, reps: int, tasks: int, cpu: int | None) -> list[Section]:
    """7a over HTTP, then 7b in-process, pinned to ``cpu`` (if not None)."""
    sections = [http(settings)]
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # in-process: keep to one core, as 3-5 do
    sections.append(throughput(reps=reps, tasks=tasks))
    return sections
