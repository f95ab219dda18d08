"""6. The journal of durable tasks: its cost per request, its throughput against
SQLite's own group commit, recovery at startup, and its size on disk.

(a) HTTP: the raw app of benchmark 1 adding one durable no-op task per request, against
the same app adding one in-memory no-op task; each measurement gets a new journal in
a new temp dir. (b) In-process: durable tasks through the request path, against a
plain sqlite3 loop doing the same writes in transactions of 100. (c) Recovery: a
nursery opened on a journal prefilled with queued tasks. (d) The journal's bytes per task.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

import trio_bg
from trio_bg._keeping import journal_file, journal_schema
from trio_bg._running.options import DEFAULT_MAX_PENDING, DEFAULT_MAX_RUNNING
from trio_bg._web.collection import RequestTasks, face_of

from .apps.counting import WELCOME_ARGUMENTS
from .bench_http import (
    App,
    HttpSettings,
    Measurement,
    run_matrix,
    tasks_cell,
    versus_cells,
)
from .section import Section, Table, median, verdict

HTTP_TARGET = 0.85
"""req/s with a durable task per request ÷ req/s with an in-memory one."""
THROUGHPUT_TARGET = 0.5
"""Durable tasks per second in-process ÷ SQLite's own group-commit ceiling."""
SERVING_TARGET = 2.0
"""Seconds from entering open_background_nursery on the large journal to its block."""
MEMORY_TARGET = 1.25
"""Recovery's memory peak with the large journal ÷ with one a fifth of its size."""

NAME = "benchmarks.journal.welcome"
ARGUMENTS = WELCOME_ARGUMENTS
"""A typical durable task's arguments: a welcome e-mail to send."""
PAYLOAD = json.dumps([[], ARGUMENTS], ensure_ascii=False, separators=(",", ":"))
"""The JSON a journal row keeps for them, as trio_bg encodes it (109 bytes)."""

CEILING_BATCH = 100
"""Rows per transaction in the plain sqlite3 loop."""
CONCURRENCY = CEILING_BATCH
"""Concurrent requests in the target row: as many as the ceiling's rows per transaction."""
HTTP_LIKE_CONCURRENCY = 32
"""Concurrent requests in a reference row: the HTTP benchmarks' connections."""
PREFILL_BATCH = 10_000
"""Rows per transaction when prefilling a journal for recovery."""
CLAIM_BOUND = DEFAULT_MAX_RUNNING + DEFAULT_MAX_PENDING // 2
"""Rows the nursery is meant to claim at startup, at most, before its block starts."""


class _Finish:
    """Counts the tasks that ran; wakes the measurement at the last one."""

    def __init__(self) -> None:
        self.ran = 0
        self.expected = -1
        self.done: trio.Event | None = None

    def reset(self, expected: int) -> trio.Event:
        """Call in trio's thread, inside the run that measures."""
        self.ran, self.expected, self.done = 0, expected, trio.Event()
        return self.done

    def one(self) -> None:
        self.ran += 1
        if self.ran == self.expected and self.done is not None:
            self.done.set()


FINISH = _Finish()


@trio_bg.task(name=NAME, durable=True)
async def welcome(user_id: int, email: str, template: str, locale: str, plan: str) -> None:
    """The durable no-op task of (b) and (c), with typical arguments."""
    FINISH.one()


async def in_memory_welcome(
    user_id: int, email: str, template: str, locale: str, plan: str
) -> None:
    """The same task, not durable: the no-journal reference row of (b)."""
    FINISH.one()


def _rows_in(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        count: int = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
        return count


def _filesystem(path: Path) -> str:
    """The file system ``path`` is on, as /proc/mounts tells ("ext4 on /dev/vda")."""
    best, found = "", "file system unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind, *_ = line.split()
            inside = (str(path.resolve()) + "/").startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, found = mount, f"{kind} on {device}"
    return found


def _temp_root() -> Path:
    return Path(tempfile.gettempdir())


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"  {text}".ljust(60), end="\r", file=sys.stderr)


T = TypeVar("T")


def _rotated(items: list[T], rep: int) -> list[T]:
    """``items`` in the order of rep ``rep``: rotated by one more each rep."""
    shift = rep % len(items)
    return items[shift:] + items[:shift]


# -- (a) HTTP -------------------------------------------------------------------------

IN_MEMORY = App("raw+trio_bg", "noop", "in-memory no-op task, no journal")
CONFIGURED = App("raw+trio_bg", "noop", "in-memory no-op task, journal configured", journal=True)
DURABLE = App(
    "raw+trio_bg", "durable", "durable no-op task, default (synchronous=normal)", journal=True
)
DURABLE_FULL = App(
    "raw+trio_bg",
    "durable",
    "durable no-op task, synchronous=full",
    journal=True,
    options=(("journal_synchronous", "full"),),
)


def _cpu(runs: list[Measurement]) -> tuple[str, str]:
    """Median µs of CPU per request: trio's thread, and the process's other threads."""
    trio_thread, other = [], []
    for m in runs:
        main, process = m.cpu_per_request("cpu_trio_us"), m.cpu_per_request("cpu_process_us")
        if main is not None and process is not None:
            trio_thread.append(main)
            other.append(process - main)
    if not trio_thread:
        return "?", "?"
    return f"{median(trio_thread):.0f}", f"{median(other):.0f}"


def http(settings: HttpSettings) -> Section:
    """(a) req/s and latency with one durable task per request, against in-memory."""
    apps = [IN_MEMORY, CONFIGURED, DURABLE, DURABLE_FULL]
    matrix = run_matrix(apps, settings, "journal, HTTP")
    table = Table(
        [
            "app, one task per request",
            "req/s",
            "p50 ms",
            "p99 ms",
            "÷ in-memory",
            "+p50 ms",
            "+p99 ms",
            "CPU µs/req, trio",
            "other threads",
            "tasks completed",
            "rows left",
            "target",
        ]
    )
    for app in apps:
        runs = [m for m in matrix.runs(app) if m.load is not None]
        if not runs:
            table.add(app.label, "failed")
            continue
        ratio = matrix.ratio(app, IN_MEMORY)
        table.add(
            app.label,
            *versus_cells(matrix, app, IN_MEMORY, runs),
            *_cpu(runs),
            tasks_cell(app, runs),
            f"{sum(m.journal_rows or 0 for m in runs)}" if app.journal else "-",
            verdict(ratio >= HTTP_TARGET, f"≥ {HTTP_TARGET}") if app == DURABLE else "",
        )
    where = _temp_root()
    return Section(
        title=f"6a. Journal, HTTP: raw ASGI app + BackgroundTaskMiddleware, {settings.reps} "
        f"reps x {settings.duration} s",
        table=table,
        notes=[
            "÷ in-memory: median of per-rep req/s ratios against the first row (same rep, same "
            "load; higher is better); +p50/+p99: median of per-rep latency differences against "
            "it: what storing the task before the response completes adds. The "
            "journal-configured row adds no durable task: with a journal the middleware holds "
            "each response's start until its body (so that a failed commit can still answer "
            "503), and the journal's thread only renews its lease.",
            f"Each measurement gets a new journal in a new temp dir under {where} "
            f"({_filesystem(where)}); the journal's thread runs on the server's core. rows left: "
            "rows in the journal once the load, the drain and the server's stop were over, "
            "summed over reps: 0, or the run fails (a completed or discarded task's row must go).",
            "CPU µs/req: the server's CPU time per request answered, from just before the load "
            "until its tasks had run (the app reports it on /count): its trio thread, and its "
            "other threads (the journal's). The whole server is pinned to one core, so the "
            "journal thread's CPU is taken from trio's.",
            "tasks completed: as in benchmark 1; the durable tasks of requests cut off when the "
            "load stopped are discarded, and their rows removed.",
        ],
        failures=matrix.failures(),
        data={"measurements": matrix.as_data()},
    )


# -- (b) throughput ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Throughput:
    seconds: float
    """From the first task added until every task ran and its row was removed (for the
    nursery: until its block was left, the journal closed)."""
    ran: int
    commits: int
    """Transactions committed: the journal's (its whole life), or the loop's."""
    cpu_main: float
    """CPU seconds of the thread that ran trio (for the ceiling: the loop's)."""
    cpu_other: float
    """CPU seconds of the process's other threads meanwhile (the journal's)."""
    rows_left: int


@contextlib.contextmanager
def _counting_commits() -> Iterator[list[int]]:
    """Count the journal's committed transactions, by wrapping the function each of them
    goes through (``journal_schema.transaction``), for one measurement only."""
    original = journal_schema.transaction
    count = [0]

    @contextlib.contextmanager
    def transaction(connection: sqlite3.Connection) -> Iterator[None]:
        with original(connection):
            yield
        count[0] += 1

    journal_schema.transaction = transaction
    try:
        yield count
    finally:
        journal_schema.transaction = original


def ceiling(tasks: int, directory: Path, synchronous: str = "NORMAL") -> Throughput:
    """SQLite alone, in a plain loop: the journal's schema, WAL, ``synchronous`` (the
    journal's default, NORMAL, unless told); INSERT 100 rows (the same name and JSON)
    and COMMIT, DELETE them and COMMIT, repeated."""
    db = sqlite3.connect(directory / "ceiling.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.executescript(journal_schema.SCHEMA)
        insert = (
            "INSERT INTO tasks (name, arguments, attempt, owner, created) VALUES (?, ?, 1, 1, ?)"
        )
        delete = "DELETE FROM tasks WHERE id = ?"
        commits = 0
        cpu, clock = time.thread_time(), time.perf_counter()
        for start in range(0, tasks, CEILING_BATCH):
            count = min(CEILING_BATCH, tasks - start)
            db.execute("BEGIN IMMEDIATE")
            db.executemany(insert, [(NAME, PAYLOAD, time.time())] * count)
            last: int = db.execute("SELECT last_insert_rowid()").fetchone()[0]
            db.execute("COMMIT")
            db.execute("BEGIN IMMEDIATE")
            db.executemany(delete, [(id,) for id in range(last - count + 1, last + 1)])
            db.execute("COMMIT")
            commits += 2
        seconds, cpu = time.perf_counter() - clock, time.thread_time() - cpu
        left: int = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    finally:
        db.close()
    return Throughput(seconds, tasks, commits, cpu, 0.0, left)


Adder = Callable[[trio_bg.BackgroundNursery, int], Awaitable[None]]


async def _requests(
    nursery: trio_bg.BackgroundNursery,
    tasks: int,
    *,
    concurrency: int,
    func: Callable[..., Awaitable[None]],
) -> None:
    """``concurrency`` trio tasks, each a stream of requests as the middleware serves
    them: the request's collection, one task added, the durable ones stored (what the
    middleware awaits before the final body), the final body sent (a checkpoint here),
    the tasks handed off."""

    async def client(requests: int) -> None:
        for _ in range(requests):
            collection = RequestTasks(nursery, ordered=False)
            face_of(collection).add_task(func, **ARGUMENTS)
            if collection.uncommitted:
                await collection.commit()
            await trio.lowlevel.checkpoint()
            collection.hand_off()

    async with trio.open_nursery() as clients:
        for i in range(concurrency):
            clients.start_soon(client, tasks // concurrency + (i < tasks % concurrency))


async def _start_soon(nursery: trio_bg.BackgroundNursery, tasks: int) -> None:
    """Every task added at once with start_soon, outside requests: each is stored (in
    a trio task of its own, its commit grouped with the others), then run."""
    for _ in range(tasks):
        nursery.start_soon(welcome, **ARGUMENTS)


async def _through_nursery(
    tasks: int, *, add: Adder, journal: str | None, **options: Any
) -> Throughput:
    done = FINISH.reset(tasks)
    with _counting_commits() as commits:
        async with trio_bg.open_background_nursery(
            journal=journal, max_pending=max(tasks, DEFAULT_MAX_PENDING), **options
        ) as nursery:
            cpu, process, clock = time.thread_time(), time.process_time(), time.perf_counter()
            await add(nursery, tasks)
            await done.wait()
        seconds = time.perf_counter() - clock
        cpu, process = time.thread_time() - cpu, time.process_time() - process
    left = _rows_in(Path(journal)) if journal not in (None, journal_schema.MEMORY) else 0
    return Throughput(seconds, FINISH.ran, commits[0], cpu, process - cpu, left)


JournalKind = Literal["file", "memory", "none"]


def _in_trio(
    add: Adder, *, journal: JournalKind = "file", **options: Any
) -> Callable[[int, Path], Throughput]:
    def measure(tasks: int, directory: Path) -> Throughput:
        path = {"file": str(directory / "tasks.db"), "memory": journal_schema.MEMORY, "none": None}
        run = partial(_through_nursery, add=add, journal=path[journal], **options)
        return trio.run(run, tasks)

    return measure


CEILING = "SQLite alone, synchronous=NORMAL (the ceiling)"
TARGET_ROW = f"request path, {CONCURRENCY} concurrent, default (synchronous=normal)"


def _variants() -> dict[str, Callable[[int, Path], Throughput]]:
    def requests(concurrency: int, func: Callable[..., Awaitable[None]] = welcome) -> Adder:
        return partial(_requests, concurrency=concurrency, func=func)

    return {
        CEILING: ceiling,
        "SQLite alone, synchronous=FULL": partial(ceiling, synchronous="FULL"),
        TARGET_ROW: _in_trio(requests(CONCURRENCY)),
        f"request path, {HTTP_LIKE_CONCURRENCY} concurrent": _in_trio(
            requests(HTTP_LIKE_CONCURRENCY)
        ),
        f"request path, {CONCURRENCY} concurrent, no statuses kept": _in_trio(
            requests(CONCURRENCY), journal_statuses_kept_for=0
        ),
        f"request path, {CONCURRENCY} concurrent, synchronous=full": _in_trio(
            requests(CONCURRENCY), journal_synchronous="full"
        ),
        "start_soon outside requests, all at once": _in_trio(_start_soon),
        f"request path, {CONCURRENCY} concurrent, journal=':memory:'": _in_trio(
            requests(CONCURRENCY), journal="memory"
        ),
        f"request path, {CONCURRENCY} concurrent, in-memory task, no journal": _in_trio(
            requests(CONCURRENCY, in_memory_welcome), journal="none"
        ),
    }


def _measure_once(measure: Callable[[int, Path], Throughput], tasks: int, root: Path) -> Throughput:
    directory = Path(tempfile.mkdtemp(dir=root))
    try:
        gc.collect()
        return measure(tasks, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def throughput(*, reps: int, tasks: int) -> Section:
    """(b) durable tasks per second in-process ÷ what SQLite alone does in the same run."""
    variants = _variants()
    names = list(variants)
    runs: dict[str, list[Throughput]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="trio_bg_bench_") as root:
        for measure in variants.values():  # warm up every path
            _measure_once(measure, min(tasks, 2_000), Path(root))
        for rep in range(reps):
            _progress(f"journal, throughput: rep {rep + 1}/{reps}")
            for name in _rotated(names, rep):
                runs[name].append(_measure_once(variants[name], tasks, Path(root)))
    _progress("")

    failures = [
        f"journal throughput: {name} ran {r.ran:,} of {tasks:,} tasks, left {r.rows_left} rows"
        for name, named_runs in runs.items()
        for r in named_runs
        if r.ran != tasks or r.rows_left
    ]
    table = Table(
        [
            "",
            "tasks/s",
            "÷ SQLite alone",
            "tasks/commit",
            "CPU µs/task, main thread",
            "other threads",
            "target",
        ]
    )
    for name, results in runs.items():
        ratio = median(
            [base.seconds / r.seconds for base, r in zip(runs[CEILING], results, strict=True)]
        )
        table.add(
            name,
            f"{tasks / median([r.seconds for r in results]):,.0f}",
            f"{ratio:.3f}",
            f"{tasks / median([r.commits for r in results]):.1f}" if results[0].commits else "-",
            f"{median([r.cpu_main for r in results]) / tasks * 1e6:.1f}",
            f"{median([r.cpu_other for r in results]) / tasks * 1e6:.1f}",
            verdict(ratio >= THROUGHPUT_TARGET, f"≥ {THROUGHPUT_TARGET}")
            if name == TARGET_ROW
            else "",
        )
    root_dir = _temp_root()
    return Section(
        title=f"6b. Journal throughput in-process: {tasks:,} durable no-op tasks per run "
        f"({len(PAYLOAD)}-byte JSON arguments), {reps} reps, one core",
        table=table,
        notes=[
            "tasks/s: from the first task added until every task ran and its row was removed "
            "(the nursery's block left, the journal closed). ÷ SQLite alone: median of per-rep "
            f"ratios against a plain sqlite3 loop on the journal's schema (WAL, NORMAL: the "
            f"journal's default; a FULL row for reference): INSERT "
            f"{CEILING_BATCH} rows + COMMIT, DELETE them + COMMIT, repeated; higher is better.",
            f"The request path is what the middleware does per request: "
            f"RequestTasks, add_task, await commit() (group commit: the "
            f"concurrent requests' rows share a transaction), a checkpoint for the body, "
            f"hand_off(). The target row runs {CONCURRENCY} requests at once, so that a "
            f"transaction can hold as many rows as the ceiling's; the {HTTP_LIKE_CONCURRENCY} "
            "row matches the HTTP benchmarks' connections. tasks/commit: tasks ÷ transactions "
            "the journal committed (its inserts and its removals).",
            "CPU: the thread that runs trio, and the process's other threads (the journal's) "
            f"meanwhile; everything runs pinned to one core. Journal files under {root_dir} "
            f"({_filesystem(root_dir)}).",
        ],
        failures=failures,
        data={
            "tasks": tasks,
            "runs": {name: [asdict(r) for r in results] for name, results in runs.items()},
        },
    )


# -- (c) recovery and (d) size -------------------------------------------------------


def prefill(path: Path, rows: int) -> None:
    """A journal holding ``rows`` queued tasks that no process holds (as if its process
    had died and its lease expired), written in big transactions, then checkpointed."""
    db = journal_schema.connect(str(path))
    try:
        owner = journal_file.join(db, 60.0)
        for start in range(0, rows, PREFILL_BATCH):
            count = min(PREFILL_BATCH, rows - start)
            with journal_schema.transaction(db):
                journal_file.append(db, owner, [(NAME, PAYLOAD, 1)] * count)
        with journal_schema.transaction(db):
            journal_file.leave(db, owner, ())
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


@dataclass(frozen=True, slots=True)
class Recovery:
    rows: int
    serving: float
    """Seconds from entering open_background_nursery to its block starting."""
    drain: float
    """Seconds from the block starting until the last task ran."""
    claimed_before_serving: int
    """Tasks taken from the journal when the block started (stats.recovered)."""
    ran_before_serving: int
    ran: int
    rows_left: int
    peak_bytes: int | None
    """tracemalloc's peak during the recovery, above what was traced before it."""


async def recover(rows: int, *, path: Path, traced: bool) -> Recovery:
    done = FINISH.reset(rows)
    base = 0
    if traced:
        gc.collect()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    clock = time.perf_counter()
    async with trio_bg.open_background_nursery(journal=str(path)) as nursery:
        serving = time.perf_counter() - clock
        stats = nursery.stats
        ran_before = FINISH.ran
        await done.wait()
        drain = time.perf_counter() - clock - serving
        peak = tracemalloc.get_traced_memory()[1] - base if traced else None
    return Recovery(
        rows=rows,
        serving=serving,
        drain=drain,
        claimed_before_serving=stats.recovered,
        ran_before_serving=ran_before,
        ran=FINISH.ran,
        rows_left=_rows_in(path),
        peak_bytes=peak,
    )


def _recover_copy(source: Path, rows: int, root: Path, *, traced: bool) -> Recovery:
    """Recover a fresh copy of the prefilled journal at ``source``."""
    directory = Path(tempfile.mkdtemp(dir=root))
    try:
        path = directory / "tasks.db"
        shutil.copyfile(source, path)
        gc.collect()
        if not traced:
            return trio.run(partial(recover, path=path, traced=False), rows)
        tracemalloc.start()
        try:
            return trio.run(partial(recover, path=path, traced=True), rows)
        finally:
            tracemalloc.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Size:
    rows: int
    file_bytes: int
    table_bytes: int | None
    index_bytes: int | None


def _size(path: Path, rows: int) -> Size:
    """The checkpointed journal's size, and its tasks table's and index's (dbstat)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            pages = dict(db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))
        except sqlite3.Error:  # SQLite built without dbstat
            pages = {}
    return Size(rows, path.stat().st_size, pages.get("tasks"), pages.get("tasks_by_state"))


def recovery(*, reps: int, rows: int, memory_reps: int) -> list[Section]:
    """(c) start to serving, drain and memory with ``rows`` queued tasks (and a fifth of
    that); (d) the journal's bytes per task."""
    small = rows // 5
    sizes = [rows, small]
    timed: dict[int, list[Recovery]] = {n: [] for n in sizes}
    traced: dict[int, list[Recovery]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="trio_bg_bench_") as root_name:
        root = Path(root_name)
        sources = {n: root / f"prefilled-{n}.db" for n in sizes}
        empty = root / "empty.db"
        for n, source in sources.items():
            prefill(source, n)
        prefill(empty, 0)
        on_disk = [_size(empty, 0), *(_size(sources[n], n) for n in sizes)]
        _recover_copy(sources[small], small, root, traced=False)  # warm up
        for rep in range(reps):
            _progress(f"journal, recovery: rep {rep + 1}/{reps}")
            for n in _rotated(sizes, rep):
                timed[n].append(_recover_copy(sources[n], n, root, traced=False))
        for rep in range(memory_reps):
            _progress(f"journal, recovery memory: rep {rep + 1}/{memory_reps}")
            for n in _rotated(sizes, rep):
                traced[n].append(_recover_copy(sources[n], n, root, traced=True))
    _progress("")
    failures = [
        f"journal recovery of {r.rows:,} rows: ran {r.ran:,}, left {r.rows_left} rows"
        for results in (timed, traced)
        for named in results.values()
        for r in named
        if r.ran != r.rows or r.rows_left
    ]
    return [
        _recovery_section(timed, traced, rows, small, reps, memory_reps, failures),
        _size_section(on_disk),
    ]


def _recovery_section(
    timed: dict[int, list[Recovery]],
    traced: dict[int, list[Recovery]],
    rows: int,
    small: int,
    reps: int,
    memory_reps: int,
    failures: list[str],
) -> Section:
    table = Table(
        [
            "queued rows at start",
            "start to serving, s",
            "claimed before",
            "ran before",
            "drain after, s",
            "tasks/s",
            "memory peak, MiB",
            "target",
        ]
    )

    def peak(n: int) -> float:
        return median([r.peak_bytes or 0 for r in traced[n]])

    for n in (rows, small):
        results = timed[n]
        serving = median([r.serving for r in results])
        target = verdict(serving <= SERVING_TARGET, f"≤ {SERVING_TARGET} s") if n == rows else ""
        table.add(
            f"{n:,}",
            f"{serving:.3f}",
            f"{median([r.claimed_before_serving for r in results]):,.0f}",
            f"{median([r.ran_before_serving for r in results]):,.0f}",
            f"{median([r.drain for r in results]):.3f}",
            f"{n / median([r.serving + r.drain for r in results]):,.0f}",
            f"{peak(n) / 2**20:.2f}",
            target,
        )
    serving_ratio = median(
        [
            big.serving / little.serving
            for big, little in zip(timed[rows], timed[small], strict=True)
        ]
    )
    memory_ratio = peak(rows) / peak(small) if peak(small) else float("nan")
    table.add(
        f"  {rows:,} ÷ {small:,}",
        f"{serving_ratio:.2f}",
        "",
        "",
        "",
        "",
        f"{memory_ratio:.2f}",
        verdict(memory_ratio <= MEMORY_TARGET, f"memory ≤ {MEMORY_TARGET}"),
    )
    return Section(
        title=f"6c. Journal recovery: a nursery opened on a journal of queued durable no-op tasks, "
        f"{reps} reps (memory: {memory_reps})",
        table=table,
        notes=[
            "Each run opens open_background_nursery(journal=...) (default max_running "
            f"{DEFAULT_MAX_RUNNING:,}, max_pending {DEFAULT_MAX_PENDING:,}) on a fresh copy of a "
            "journal prefilled, in big transactions, with rows no live process holds. start to "
            "serving: from entering it until its block starts; the nursery is meant to claim "
            f"at most max_running + max_pending // 2 = {CLAIM_BOUND:,} rows before that, and "
            "stream the rest as room frees. claimed before / ran before: tasks taken from the "
            "journal / tasks that had run by then. drain after: from the block starting until "
            "the last task ran. tasks/s: rows ÷ (start to serving + drain).",
            "memory peak: tracemalloc's peak during a recovery (separate runs: tracemalloc slows "
            "them), above what was traced before it; SQLite's own page cache is not traced (its "
            "default cache_size bounds it to about 2 MiB). Bounded by max_pending, the peak "
            f"should not grow with the journal: {rows:,} ÷ {small:,} near 1.",
        ],
        failures=failures,
        data={
            "timed": {n: [asdict(r) for r in results] for n, results in timed.items()},
            "traced": {n: [asdict(r) for r in results] for n, results in traced.items()},
        },
    )


def _size_section(sizes: list[Size]) -> Section:
    empty, *filled = sizes
    table = Table(
        ["queued rows", "file bytes", "bytes/task", "of which table", "of which index", "JSON args"]
    )

    def per_task(value: int | None, base: int | None, rows: int) -> str:
        return "-" if value is None or base is None else f"{(value - base) / rows:.1f}"

    table.add("0 (empty journal)", f"{empty.file_bytes:,}", "", "", "", "")
    for size in filled:
        table.add(
            f"{size.rows:,}",
            f"{size.file_bytes:,}",
            per_task(size.file_bytes, empty.file_bytes, size.rows),
            per_task(size.table_bytes, empty.table_bytes, size.rows),
            per_task(size.index_bytes, empty.index_bytes, size.rows),
            f"{len(PAYLOAD)}",
        )
    return Section(
        title="6d. Journal bytes per queued task, on disk",
        table=table,
        notes=[
            "The prefilled journals of 6c, checkpointed (WAL folded in and truncated): file size "
            "less the empty journal's, ÷ rows. Each row keeps the task's name "
            f"({len(NAME)} bytes here), its JSON arguments, attempt, state, owner, time "
            "created; the index (state, owner, id) is what claims and counts use. table/index: "
            "SQLite's dbstat, less the empty journal's."
        ],
        data={"sizes": [asdict(size) for size in sizes]},
    )


def run(
    settings: HttpSettings,
    *,
    reps: int,
    tasks: int,
    rows: int,
    memory_reps: int,
    cpu: int | None,
) -> list[Section]:
    """6a over HTTP, then 6b, 6c and 6d in-process, pinned to ``cpu`` (if not None)."""
    sections = [http(settings)]
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # in-process: keep to one core, as 3-5 do
    sections.append(throughput(reps=reps, tasks=tasks))
    sections += recovery(reps=reps, rows=rows, memory_reps=memory_reps)
    return sections
