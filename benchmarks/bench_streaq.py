"""8. Remote tasks: handing tasks to a streaq worker's queue in Redis, and running them.

(a) In-process: remote tasks handed off per second through the request path, against
streaq's own ``enqueue_many`` at the same batch size. (b) HTTP: the raw app of
benchmark 1 adding one remote task per request, against the same app adding an
in-memory one. (c) End to end: tasks handed off and run by two ``python -m trio_bg
worker`` processes, against the same tasks enqueued with ``enqueue_many``.

The section starts its own ``redis-server`` (a free loopback port, a temp dir, nothing
persisted) and empties it (FLUSHALL) after every measurement.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self, TypeVar

import trio

import trio_bg
from trio_bg._web.collection import RequestTasks, face_of

from .bench_http import App, HttpSettings, Matrix, measure, tasks_cell, versus_cells
from .inprocess import fresh_run
from .section import Section, Table, median, verdict
from .server import REPO_ROOT, free_port

if TYPE_CHECKING:
    from streaq import Worker

HANDOFF_TARGET = 1.0
"""Remote tasks handed off per second by trio_bg ÷ streaq's enqueue_many's, same batch."""
HTTP_TARGET = 0.8
"""req/s with a remote task per request ÷ req/s with an in-memory one."""
BATCHES = (1, 100, 1_000)
"""Batch sizes of (a): concurrent requests for trio_bg, tasks per enqueue_many for streaq."""
END_TO_END_BATCH = 100
WORKERS = 2
"""``python -m trio_bg worker`` processes of (c)."""
MEASURE_TIMEOUT = 120.0
"""Seconds any one in-process measurement may take (then it fails)."""
STALL_TIMEOUT = 10.0
"""Seconds without a task completing after which (c) stops waiting."""
START_TIMEOUT = 20.0
"""Seconds Redis or a worker may take to start, or to stop."""
COMMAND_TIMEOUT = 10.0
WORKER_TARGET = "benchmarks.apps.streaq_app:tasks"


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"  {text}".ljust(60), end="\r", file=sys.stderr)


T = TypeVar("T")


def _rotated(items: list[T], rep: int) -> list[T]:
    shift = rep % len(items)
    return items[shift:] + items[:shift]


# -- Redis ----------------------------------------------------------------------------


class RedisError(RuntimeError):
    """Redis did not start, or answered a command with an error."""


class Failed(RuntimeError):
    """A measurement went wrong: tasks missing or run twice, a worker that did not start."""


class RedisServer:
    """``redis-server`` on a free 127.0.0.1 port in a temp dir, persisting nothing; a
    context manager. `command` is a plain blocking client for the harness's own
    commands (a connection each: they are few)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._directory = tempfile.TemporaryDirectory(prefix="trio_bg_bench_redis_")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        log = Path(self._directory.name) / "redis.log"
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", self._directory.name,
                "--save", "",
                "--appendonly", "no",
                "--logfile", str(log),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.command("PING")
                return self
            except (OSError, RedisError) as error:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    self.__exit__(None, None, None)
                    raise RedisError(f"redis-server did not start ({error}):\n{tail}") from None
                time.sleep(0.05)

    def __exit__(self, *exc_info: object) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(START_TIMEOUT)
        self._directory.cleanup()

    def pin(self, cpus: set[int]) -> None:
        """Run it on ``cpus`` from now on."""
        assert self._process is not None
        os.sched_setaffinity(self._process.pid, cpus)

    def command(self, *args: str) -> Any:
        """Send one command, return its reply (`RedisError` for an error reply)."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), COMMAND_TIMEOUT) as connection:
            connection.sendall(request.encode())
            with connection.makefile("rb") as reader:
                return _reply(reader)

    def flush(self) -> None:
        self.command("FLUSHALL")

    def integer(self, *args: str) -> int:
        """The reply to a command answering a number, or a number as a string (GET)."""
        return int(self.command(*args) or 0)


def _reply(reader: IO[bytes]) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise RedisError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else reader.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_reply(reader) for _ in range(int(rest))]
    raise RedisError(f"unexpected reply {line!r}")


def _stream_key(worker: Worker[Any]) -> str:
    """The Redis stream a task enqueued for now (no priority given) goes to."""
    return worker.stream_key + worker.priorities[-1]


# -- the two ways to hand tasks off --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    """From the first task made until Redis acknowledged the last."""
    cpu: float
    """CPU seconds of this process meanwhile."""
    round_trips: int
    handed_off: int
    """Tasks Redis acknowledged: the nursery's count (streaq: the tasks enqueued)."""
    finished: float | None = None
    """With a `Wait`: seconds from the first task made until it returned."""
    ran: int | None = None
    """With a `Wait`: the tasks it saw done."""


Wait = Callable[[], Awaitable[int]]


@contextlib.contextmanager
def _counting_round_trips() -> Iterator[list[int]]:
    """Count the hand-off's pipelines to Redis (``Handoff._publish``), for one run."""
    from trio_bg._keeping.handoff import Handoff

    original = Handoff._publish
    count = [0]

    async def publish(self: Handoff, tasks: Any, *, reloaded: bool = False) -> None:
        count[0] += not reloaded
        await original(self, tasks, reloaded=reloaded)

    Handoff._publish = publish  # type: ignore[method-assign]
    try:
        yield count
    finally:
        Handoff._publish = original  # type: ignore[method-assign]


async def _requests(
    nursery: trio_bg.BackgroundNursery, remote: Any, tasks: int, concurrency: int
) -> None:
    """``concurrency`` trio tasks, each a stream of requests as the middleware serves
    them: the request's collection, one remote task added, the hand-off to Redis (what
    the middleware awaits before the body), the body sent (a checkpoint), the tasks
    passed on to the nursery (which counts them handed off)."""
    from .apps.streaq_app import ARGUMENTS

    async def client(requests: int) -> None:
        for _ in range(requests):
            collection = RequestTasks(nursery, ordered=False)
            face_of(collection).add_task(remote, **ARGUMENTS)
            if collection.uncommitted:
                await collection.commit()
            await trio.lowlevel.checkpoint()
            collection.hand_off()

    async with trio.open_nursery() as clients:
        for i in range(concurrency):
            clients.start_soon(client, tasks // concurrency + (i < tasks % concurrency))


async def via_trio_bg(tasks: int, *, url: str, batch: int, wait: Wait | None = None) -> Run:
    """``tasks`` remote tasks through the request path, ``batch`` requests at once."""
    from .apps.streaq_app import NAME, make_worker

    worker = make_worker(url)
    with _counting_round_trips() as trips:
        async with trio_bg.open_background_nursery(streaq=worker) as nursery:
            with trio.fail_after(MEASURE_TIMEOUT):
                cpu, clock = time.process_time(), time.perf_counter()
                await _requests(nursery, worker.registry[NAME], tasks, batch)
                seconds, cpu = time.perf_counter() - clock, time.process_time() - cpu
                ran = None if wait is None else await wait()
                finished = None if wait is None else time.perf_counter() - clock
            handed_off = nursery.stats.handed_off
    return Run(seconds, cpu, trips[0], handed_off, finished, ran)


async def via_streaq(tasks: int, *, url: str, batch: int, wait: Wait | None = None) -> Run:
    """``tasks`` tasks enqueued by streaq itself: ``enqueue_many`` of ``batch`` at a
    time, one after another; one at a time, each task awaited (streaq's ``enqueue``)."""
    from .apps.streaq_app import ARGUMENTS, NAME, make_worker

    worker = make_worker(url)
    remote = worker.registry[NAME]
    async with worker:
        with trio.fail_after(MEASURE_TIMEOUT):
            cpu, clock = time.process_time(), time.perf_counter()
            for start in range(0, tasks, batch):
                if batch == 1:
                    await remote.enqueue(**ARGUMENTS)
                else:
                    count = min(batch, tasks - start)
                    await worker.enqueue_many([remote.enqueue(**ARGUMENTS) for _ in range(count)])
            seconds, cpu = time.perf_counter() - clock, time.process_time() - cpu
            ran = None if wait is None else await wait()
            finished = None if wait is None else time.perf_counter() - clock
    return Run(seconds, cpu, math.ceil(tasks / batch), tasks, finished, ran)


Via = Callable[..., Awaitable[Run]]
SIDES: dict[str, Via] = {"trio_bg": via_trio_bg, "streaq": via_streaq}


# -- (a) hand-off rate -----------------------------------------------------------------


@dataclass
class Rates:
    runs: dict[tuple[str, int], list[Run | None]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def ratio(self, batch: int) -> float:
        """Median over reps of trio_bg's tasks/s ÷ streaq's, same rep."""
        pairs = zip(self.runs["trio_bg", batch], self.runs["streaq", batch], strict=True)
        return median([s.seconds / t.seconds for t, s in pairs if t is not None and s is not None])


def _tasks_at(batch: int, tasks: int) -> int:
    """One at a time takes a round trip per task: a tenth as many."""
    return max(tasks // 10, 100) if batch == 1 else tasks


def _measure_handoff(redis: RedisServer, side: str, batch: int, tasks: int) -> Run:
    from .apps.streaq_app import tasks as worker

    redis.flush()
    run = fresh_run(partial(SIDES[side], url=redis.url, batch=batch), tasks)
    in_redis = redis.integer("XLEN", _stream_key(worker))
    redis.flush()
    if run.handed_off != tasks or in_redis != tasks:
        raise Failed(f"{tasks:,} tasks: {run.handed_off:,} handed off, {in_redis:,} in Redis")
    return run


def handoff(redis: RedisServer, *, reps: int, tasks: int, readme: list[str]) -> Section:
    """(a) remote tasks handed off per second, trio_bg ÷ streaq, at each batch size."""
    pairs = [(side, batch) for batch in BATCHES for side in SIDES]
    rates = Rates({pair: [] for pair in pairs})
    for side, batch in pairs:  # warm up every path
        try:
            _measure_handoff(redis, side, batch, min(_tasks_at(batch, tasks), 2_000))
        except Exception as error:
            rates.failures.append(f"hand-off, {side}, batch {batch} (warm-up): {error!r}")
    for rep in range(reps):
        _progress(f"streaq, hand-off: rep {rep + 1}/{reps}")
        for side, batch in _rotated(pairs, rep):
            try:
                run: Run | None = _measure_handoff(redis, side, batch, _tasks_at(batch, tasks))
            except Exception as error:
                rates.failures.append(f"hand-off, {side}, batch {batch} (rep {rep + 1}): {error!r}")
                run = None
            rates.runs[side, batch].append(run)
    _progress("")

    table = Table(["", "tasks", "tasks/s", "÷ streaq", "tasks/round trip", "CPU µs/task", "target"])
    for batch in BATCHES:
        count = _tasks_at(batch, tasks)
        ratio = rates.ratio(batch)
        met = verdict(ratio >= HANDOFF_TARGET, f"≥ {HANDOFF_TARGET}") if batch > 1 else ""
        labels = {
            "streaq": f"streaq: enqueue_many({batch:,})"
            if batch > 1
            else "streaq: await enqueue()",
            "trio_bg": f"trio_bg: {batch:,} concurrent request{'s' * (batch > 1)}",
        }
        rate: dict[str, str] = {}
        table.add(f"batch {batch:,}" + (" (one at a time)" if batch == 1 else ""))
        for side in ("streaq", "trio_bg"):
            runs = [r for r in rates.runs[side, batch] if r is not None]
            if not runs:
                table.add(f"  {labels[side]}", f"{count:,}", "failed")
                continue
            ours = side == "trio_bg"
            rate[side] = f"{count / median([r.seconds for r in runs]):,.0f}"
            table.add(
                f"  {labels[side]}",
                f"{count:,}",
                rate[side],
                f"{ratio:.3f}" if ours else "1.000",
                f"{count / median([r.round_trips for r in runs]):,.1f}",
                f"{median([r.cpu for r in runs]) / count * 1e6:.1f}",
                met if ours else "",
            )
        if len(rate) == 2:
            readme.append(
                f"| hand-off, {labels['trio_bg'][9:]} vs {labels['streaq'][8:]} "
                f"| {rate['trio_bg']} tasks/s | {rate['streaq']} tasks/s | {ratio:.3f} "
                f"| {met or '-'} |"
            )
    return Section(
        title=f"8a. Remote tasks, hand-off rate from one trio process: {reps} reps, one core",
        table=table,
        notes=[
            "tasks/s: from the first task made until Redis acknowledged the last (the "
            "connection made before). ÷ streaq: median of per-rep ratios of trio_bg's tasks/s "
            "to streaq's at the same batch size (same rep; every row once per rep, in an order "
            "rotated from rep to rep); higher is better. Redis is emptied (FLUSHALL) after "
            "every measurement, once the tasks in its stream were counted.",
            "trio_bg: the request path, as the middleware runs it for each request: "
            "RequestTasks, add_task(remote task, 5 keyword arguments), await "
            "commit() (the hand-off: the tasks of the requests waiting meanwhile go in the next "
            "pipeline), a checkpoint for the body, hand_off(); N requests at once make batches "
            "of up to N (tasks/round trip: the pipelines actually sent). streaq: the same task "
            "made with task.enqueue() and enqueue_many() of N at a time, one after another; "
            "one at a time, each task awaited (its own enqueue, no pipeline).",
            "CPU µs/task: this process's CPU time ÷ tasks. Both sides use a worker made by "
            "trio_bg.streaq.worker() (JSON). This process runs on one core, redis-server on "
            "another.",
        ],
        failures=rates.failures,
        data={
            "tasks": {batch: _tasks_at(batch, tasks) for batch in BATCHES},
            "runs": {
                f"{side}, batch {batch}": [None if r is None else asdict(r) for r in runs]
                for (side, batch), runs in rates.runs.items()
            },
        },
    )


# -- (b) HTTP -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreaqApp(App):
    """An app of `benchmarks.apps.streaq_app`: ``task`` is "remote" or "noop"."""

    streaq: bool = False

    def target(self, journal: str | None = None) -> str:
        return f"benchmarks.apps.streaq_app:build({self.task!r}, streaq={self.streaq})"


IN_MEMORY = StreaqApp("raw+trio_bg", "noop", "in-memory no-op task, no streaq worker")
CONFIGURED = StreaqApp(
    "raw+trio_bg", "noop", "in-memory no-op task, streaq worker configured", streaq=True
)
REMOTE = StreaqApp("raw+trio_bg", "remote", "remote no-op task (to Redis)", streaq=True)
HTTP_APPS: list[App] = [IN_MEMORY, CONFIGURED, REMOTE]


def http(redis: RedisServer, settings: HttpSettings, readme: list[str]) -> Section:
    """(b) req/s and latency with one remote task per request, against in-memory."""
    from .apps.streaq_app import tasks as worker

    matrix = Matrix(list(HTTP_APPS))
    failures: list[str] = []
    in_redis: dict[App, int] = dict.fromkeys(HTTP_APPS, 0)
    redis.flush()
    for rep in range(settings.reps):
        _progress(f"streaq, HTTP: rep {rep + 1}/{settings.reps}")
        matrix.reps.append({})
        for app in _rotated(HTTP_APPS, rep):
            m = matrix.reps[rep][app] = measure(app, rep, settings)
            stored = redis.integer("XLEN", _stream_key(worker))  # the server has stopped
            redis.flush()
            in_redis[app] += stored
            handed_off = m.counts.get("handed_off", 0)
            if m.error is None and stored != handed_off:
                failures.append(
                    f"{app.label} (rep {rep + 1}): {handed_off:,} tasks handed off, "
                    f"{stored:,} in Redis"
                )
    _progress("")
    table = Table(
        [
            "raw ASGI app, one task per request",
            "req/s",
            "p50 ms",
            "p99 ms",
            "÷ in-memory",
            "+p50 ms",
            "+p99 ms",
            "tasks completed",
            "in Redis",
            "target",
        ]
    )
    for app in HTTP_APPS:
        runs = [m for m in matrix.runs(app) if m.load is not None]
        if not runs:
            table.add(app.label, "failed")
            continue
        ratio = matrix.ratio(app, IN_MEMORY)
        met = verdict(ratio >= HTTP_TARGET, f"≥ {HTTP_TARGET}") if app == REMOTE else ""
        table.add(
            app.label,
            *versus_cells(matrix, app, IN_MEMORY, runs),
            tasks_cell(app, runs),
            f"{in_redis[app]:,}",
            met,
        )
        if app != IN_MEMORY:
            readme.append(
                f"| HTTP, {app.label} | {table.rows[-1][1]} req/s, p99 {table.rows[-1][3]} ms "
                f"| {table.rows[0][1]} req/s, p99 {table.rows[0][3]} ms | {ratio:.3f} "
                f"| {met or '-'} |"
            )
    return Section(
        title=f"8b. Remote tasks, HTTP: raw ASGI app + BackgroundTaskMiddleware, {settings.reps} "
        f"reps x {settings.duration} s",
        table=table,
        notes=[
            "÷ in-memory: median of per-rep req/s ratios against the first row (same rep, same "
            "load; higher is better); +p50/+p99: median of per-rep latency differences against "
            "it: what handing the task to Redis before the body goes out adds. The three rows "
            "are one app (benchmarks/apps/streaq_app.py), each task with the same 5 keyword "
            "arguments. With a streaq worker configured the middleware holds each response's "
            "start until its body (so that a failed hand-off can still answer 503): the middle "
            "row shows that alone.",
            "tasks completed: for the remote task, those Redis acknowledged (the nursery's "
            "handed_off); no worker runs them. in Redis: the tasks in the queue's stream once "
            "the server had stopped, summed over reps; it must equal the tasks handed off, or "
            "the run fails. Redis is emptied after every measurement. redis-server runs on the "
            "load generator's core, so that the server's core is the server's alone.",
        ],
        failures=[*matrix.failures(), *failures],
        data={
            "measurements": matrix.as_data(),
            "in_redis": {a.label: n for a, n in in_redis.items()},
        },
    )


# -- (c) end to end --------------------------------------------------------------------


class Workers:
    """``count`` ``python -m trio_bg worker benchmarks.apps.streaq_app:tasks`` processes;
    entered once each has joined the queue (its health key is in Redis); left with
    SIGTERM, a bounded wait, then SIGKILL to each one's process group."""

    def __init__(self, redis: RedisServer, count: int) -> None:
        self._redis = redis
        self._count = count
        self._processes: list[subprocess.Popen[bytes]] = []
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by __exit__

    def __enter__(self) -> Self:
        from streaq.constants import REDIS_HEALTH

        from .apps.streaq_app import REDIS_ENV
        from .apps.streaq_app import tasks as worker

        command = [sys.executable, "-m", "trio_bg", "worker", WORKER_TARGET]
        for _ in range(self._count):
            self._processes.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=os.environ | {REDIS_ENV: self._redis.url},
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=self._log,
                    start_new_session=True,
                )
            )
        pattern = f"{worker.prefix}{REDIS_HEALTH}:*"
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while len(self._redis.command("KEYS", pattern)) < self._count:
                if any(p.poll() is not None for p in self._processes):
                    raise Failed(f"a worker exited at start:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise Failed(f"workers not ready in {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(START_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(START_TIMEOUT)
        self._processes = []
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        self._log.seek(0)
        return b"".join(self._log.readlines()[-lines:]).decode(errors="replace")


async def _until_done(probe: Worker[Any], tasks: int) -> int:
    """Poll the tasks' counter until it reaches ``tasks``, or it stalls: the count."""
    from .apps.streaq_app import DONE_KEY

    done, progress_at = -1, time.monotonic()
    while True:
        count = int(await probe.redis.get(DONE_KEY) or 0)
        if count != done:
            done, progress_at = count, time.monotonic()
        if done >= tasks or time.monotonic() - progress_at > STALL_TIMEOUT:
            return done
        await trio.sleep(0.005)


async def _end_to_end(tasks: int, *, url: str, side: str) -> Run:
    from .apps.streaq_app import make_worker

    probe = make_worker(url)  # a connection of its own, to read the counter
    async with probe:
        return await SIDES[side](
            tasks, url=url, batch=END_TO_END_BATCH, wait=partial(_until_done, probe, tasks)
        )


def _measure_end_to_end(redis: RedisServer, side: str, tasks: int) -> Run:
    from .apps.streaq_app import DONE_KEY

    redis.flush()
    with Workers(redis, WORKERS) as workers:
        run = fresh_run(partial(_end_to_end, url=redis.url, side=side), tasks)
        if run.ran != tasks:
            raise Failed(
                f"{run.ran:,} of {tasks:,} tasks ran (waited until none ran for "
                f"{STALL_TIMEOUT:.0f} s):\n{workers.log_tail()}"
            )
    ran = redis.integer("GET", DONE_KEY)  # the workers have stopped
    redis.flush()
    if ran != tasks:
        raise Failed(f"{tasks:,} tasks ran {ran:,} times")
    return run


def end_to_end(redis: RedisServer, *, reps: int, tasks: int, readme: list[str]) -> Section:
    """(c) tasks handed off and run by 2 worker processes, trio_bg ÷ streaq alone."""
    sides = list(SIDES)
    runs: dict[str, list[Run | None]] = {side: [] for side in sides}
    failures = []
    for rep in range(reps):
        _progress(f"streaq, end to end: rep {rep + 1}/{reps}")
        for side in _rotated(sides, rep):
            try:
                run: Run | None = _measure_end_to_end(redis, side, tasks)
            except Exception as error:
                failures.append(f"end to end, {side} (rep {rep + 1}): {error}")
                run = None
            runs[side].append(run)
    _progress("")
    ratio = median(
        [
            s.finished / t.finished
            for t, s in zip(runs["trio_bg"], runs["streaq"], strict=True)
            if t is not None and s is not None and t.finished and s.finished
        ]
    )
    table = Table(["", "tasks", "all ran, s", "tasks/s", "all in Redis, s", "÷ streaq"])
    labels = {
        "streaq": f"streaq alone: enqueue_many({END_TO_END_BATCH})",
        "trio_bg": f"trio_bg: {END_TO_END_BATCH} concurrent requests",
    }
    for side in ("streaq", "trio_bg"):
        done = [r for r in runs[side] if r is not None and r.finished]
        if not done:
            table.add(labels[side], f"{tasks:,}", "failed")
            continue
        finished = median([r.finished or 0.0 for r in done])
        table.add(
            labels[side],
            f"{tasks:,}",
            f"{finished:.2f}",
            f"{tasks / finished:,.0f}",
            f"{median([r.seconds for r in done]):.2f}",
            f"{ratio:.3f}" if side == "trio_bg" else "1.000",
        )
    if len(table.rows) == 2 and table.rows[0][2] != "failed" and table.rows[1][2] != "failed":
        theirs, ours = table.rows
        readme.append(
            f"| end to end, {tasks:,} tasks, {WORKERS} workers | {ours[3]} tasks/s ({ours[2]} s) "
            f"| {theirs[3]} tasks/s ({theirs[2]} s) | {ratio:.3f} | - |"
        )
    return Section(
        title=f"8c. Remote tasks, end to end: {tasks:,} tasks run by {WORKERS} worker processes, "
        f"{reps} reps",
        table=table,
        notes=[
            f"Each measurement empties Redis, starts {WORKERS} `python -m trio_bg worker "
            f"{WORKER_TARGET}` processes (streaq's default concurrency, 16 each) and waits "
            "until both have joined the queue; then this process hands the tasks off, and "
            "waits until the counter the task increments in Redis reaches the count (polled "
            f"every 5 ms; given up after {STALL_TIMEOUT:.0f} s without progress). all ran: "
            "from the first task made until then; all in Redis: until the last was "
            "acknowledged. ÷ streaq: median of per-rep ratios of tasks/s (same rep, order "
            "rotated); higher is better. The count must equal the tasks once the workers have "
            "stopped (a task run twice fails the run).",
            f"trio_bg: the in-process request path of 8a with {END_TO_END_BATCH} requests at "
            f"once, not HTTP: streaq alone has no server in front, and 8b measures the "
            f"server's side. streaq alone: enqueue_many({END_TO_END_BATCH}), one after another. "
            "Nothing is pinned: the workers, redis-server and this process share the cores.",
        ],
        failures=failures,
        data={
            "tasks": tasks,
            "runs": {s: [None if r is None else asdict(r) for r in rs] for s, rs in runs.items()},
        },
    )


# -- the summary and the section -------------------------------------------------------


@dataclass
class Markdown(Section):
    """A section whose body is a markdown table, printed as is."""

    markdown: str = ""

    def render(self) -> str:
        return f"{self.title}\n\n{self.markdown}"


def summary(rows: list[str]) -> Markdown:
    """The parts' headline rows (``| benchmark | trio_bg | reference | ratio | target |``)
    as one markdown table, for the README."""
    markdown = "\n".join(
        ["| benchmark | trio_bg | reference | ratio | target |", "|---|---:|---:|---:|---|", *rows]
    )
    return Markdown(
        title="8d. Remote tasks, for the README (markdown)",
        markdown=markdown,
        data={"markdown": markdown},
    )


def _skip_reason() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    try:
        import streaq  # noqa: F401
    except ImportError as error:
        return f"streaq is not installed ({error}; pip install 'trio-bg[streaq]')"
    return None


def run(
    settings: HttpSettings,
    *,
    reps: int,
    tasks: int,
    end_to_end_tasks: int,
    server_cpu: int | None,
    load_cpu: int | None,
) -> list[Section]:
    """8a in-process (pinned to ``load_cpu``, Redis to ``server_cpu``), 8b over HTTP
    (Redis on ``load_cpu``, with the load generator), 8c unpinned; and the summary."""
    reason = _skip_reason()
    if reason is not None:
        return [Section(title=f"8. Remote tasks (streaq): skipped: {reason}")]
    from .apps.streaq_app import REDIS_ENV

    everywhere = os.sched_getaffinity(0)
    previous = os.environ.get(REDIS_ENV)
    sections: list[Section] = []
    readme: list[str] = []
    try:
        with RedisServer() as redis:
            os.environ[REDIS_ENV] = redis.url  # for the servers and the workers
            if load_cpu is not None and server_cpu is not None:
                os.sched_setaffinity(0, {load_cpu})
                redis.pin({server_cpu})
            sections.append(handoff(redis, reps=reps, tasks=tasks, readme=readme))
            os.sched_setaffinity(0, everywhere)
            if load_cpu is not None:
                redis.pin({load_cpu})
            sections.append(http(redis, settings, readme))
            redis.pin(everywhere)
            sections.append(end_to_end(redis, reps=reps, tasks=end_to_end_tasks, readme=readme))
    except (RedisError, OSError) as error:
        sections.append(Section(title="8. Remote tasks (streaq)", failures=[str(error)]))
    finally:
        os.sched_setaffinity(0, everywhere)
        if previous is None:
            os.environ.pop(REDIS_ENV, None)
        else:
            os.environ[REDIS_ENV] = previous
    return [*sections, summary(readme)]
