"""The distributed drill: a web server hands remote tasks to streaq workers over Redis;
under load one worker is SIGKILLed (and Redis restarted), then the web server gets
SIGTERM; once the workers drained, every remote task an answered request named must
have completed at least once. With ``poison``, a poisoned record planted mid-load must
be set aside, and no worker die of it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._crash_drill import _ledger
from ._drill import (
    KILL_WAIT,
    LEDGER_ENV,
    LOG_TAIL_LINES,
    REMOTE_HEADER,
    STARTUP_TIMEOUT,
    DrillInterrupted,
    DrillPlan,
    DrillResult,
    Load,
    Progress,
    _check_books,
    _free_port,
    _grace,
    _interrupt_on_signal,
    _load_and_stop,
    _read_report,
    _reap,
    _wait_until_listening,
    request_rows,
    row_writer,
    run_and_print,
)
from ._report import ShutdownReport
from ._supervisor import describe_exit
from ._worker_command import load_streaq_worker

if TYPE_CHECKING:
    from streaq import Worker

REDIS_ENV = "TRIO_BG_DRILL_REDIS"
"""The environment variable giving the app's module Redis's URL: with it, the module
builds the streaq worker its remote tasks go to (as ``examples/drill_app.py`` does)."""

IDLE_TIMEOUT_ENV = "TRIO_BG_DRILL_IDLE_TIMEOUT"
"""The environment variable the drill's ``--idle-timeout`` sets, for the app's module
to build its worker with (``examples/drill_app.py`` does)."""

DRAIN_MARGIN = 30.0
"""Seconds, past twice the workers' idle timeout, that they get once the web server
stopped to run every claimed task: a killed worker's tasks go to another worker once
its idle timeout has passed, on that worker's next look at the queue."""

STOP_MARGIN = 10.0
"""Seconds, past their grace period, the workers get to stop after SIGTERM."""

POLL = 0.1
"""Seconds between two looks at the ledger and the queue while the workers drain."""

POISON_NAME = "trio_bg.drill.poisoned"
"""The function the poisoned record (``--poison``) names."""

WORKER_READY = "starting worker"  # streaq's first line, before it connects
REDIS_READY = "Ready to accept connections"

# What a process's log tail leaves out: lines at INFO and below (streaq's line for each
# task), in logging's format or Redis's.
_CHATTER = re.compile(r"^\S+ \S+ \[\d+\] (?:DEBUG|INFO) |^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.*-] ")


@dataclass(frozen=True, kw_only=True)
class RemotePlan:
    """The distributed drill's options: the drill's own, and its workers' and Redis's."""

    drill: DrillPlan
    streaq: str
    """``module:name`` of the streaq worker: the workers run it, the web server hands
    its remote tasks to it. The app's own spec: the app is a BackgroundTaskMiddleware
    given its worker (``streaq=``), and the server takes it from there."""
    redis: str | None = None
    """Redis's URL; None: the drill starts a ``redis-server`` of its own."""
    workers: int = 2
    kill_worker: bool = False
    kill_redis: bool = False
    """Kill Redis mid-load and start it again on the same port (its own Redis only)."""
    redis_persists: bool = True
    """Whether the drill's own Redis keeps its data on disk (False: `kill_redis` brings
    it back empty, as a Redis without persistence, or a failover to an empty replica)."""
    idle_timeout: float | None = None
    """Set as `IDLE_TIMEOUT_ENV` for the app's module (None: left as it is)."""
    poison: bool = False
    """Plant a poisoned record (valid JSON, not a task's) in the queue mid-load: a
    worker must set it aside, and go on."""

    def server_command(self, port: int, report_path: Path) -> list[str]:
        """The web server's ``python -m trio_bg serve`` command line."""
        command = self.drill.server_command(port, report_path)
        if self.streaq != self.drill.app:
            command.append(f"--streaq={self.streaq}")
        return command

    def worker_command(self) -> list[str]:
        """A streaq worker's ``python -m trio_bg worker`` command line."""
        return [sys.executable, "-m", "trio_bg", "worker", self.streaq]


@dataclass(frozen=True, kw_only=True)
class Target:
    """A plan made ready: Redis's URL, and the streaq worker loaded in this process
    (for its queue, idle timeout and grace period)."""

    plan: RemotePlan
    url: str
    own_port: int | None
    """The port of the drill's own Redis (None: the plan's)."""
    worker: Worker[Any]


def prepare(plan: RemotePlan) -> Target:
    """Choose Redis's URL and load ``plan.streaq`` here as the workers will, with
    `REDIS_ENV` (and `IDLE_TIMEOUT_ENV`) set in this process's environment first.
    Raises what `load_streaq_worker` raises."""
    own_port = None
    url = plan.redis
    if url is None:
        own_port = _free_port()
        url = f"redis://127.0.0.1:{own_port}"
    os.environ[REDIS_ENV] = url
    if plan.idle_timeout is not None:
        os.environ[IDLE_TIMEOUT_ENV] = str(plan.idle_timeout)
    return Target(plan=plan, url=url, own_port=own_port, worker=load_streaq_worker(plan.streaq))


@dataclass(kw_only=True)
class WorkerRun:
    """One streaq worker process of the drill."""

    pid: int
    killed_after: float | None = None
    """Seconds of load before the drill SIGKILLed it (None: it was not)."""
    exit_status: int | None = None
    ran: int = 0
    """Remote tasks it ran to the end (its lines in the ledger)."""
    cut_short: int = 0
    """Remote tasks it had started and never finished (those the kill cut short)."""


@dataclass(kw_only=True)
class Poison:
    """The poisoned record the drill planted in the queue (``poison``)."""

    task_id: str
    planted_after: float
    """Seconds of load before the drill planted it."""
    error: str | None = None
    """The error its failed result records (None: no worker set it aside)."""


@dataclass(frozen=True, kw_only=True)
class RemoteBooks:
    """The remote tasks: what answered requests named, and what the workers ran."""

    claimed: int
    """Remote tasks named by answered responses (`REMOTE_HEADER`)."""
    completed: int
    """Of those, the ones that ran to the end at least once."""
    lost: tuple[str, ...]
    """The keys of those that never did."""
    extra_runs: int
    """Runs beyond the first of claimed tasks (at least once: a run whose end Redis did
    not hear of, cut off by a kill, runs again)."""
    unclaimed_runs: int
    """Runs of tasks no answered response named (handed off, but the answer was not
    received)."""


@dataclass(frozen=True, kw_only=True)
class RemoteDrillResult:
    """The outcome of a distributed drill."""

    target: Target
    server: DrillResult
    """The web server's part, as the shutdown drill sees it."""
    workers: tuple[WorkerRun, ...]
    redis_killed_after: float | None
    """Seconds of load before the drill killed Redis (None: it did not)."""
    redis_down_for: float | None
    """Seconds from that kill until Redis accepted connections again."""
    drained_after: float | None
    """Seconds from the web server's exit until every claimed task had run (None: not
    all of them did)."""
    poison: Poison | None
    books: RemoteBooks | None
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    logs: dict[str, tuple[str, ...]]
    """The last warnings and errors of each process that failed, by its name."""

    @property
    def passed(self) -> bool:
        """True when no claimed remote task was lost and every step went as planned."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data, for scripts."""
        plan, server, books = self.target.plan, self.server, self.books
        load, report = server.load, server.report
        return {
            "app": plan.drill.app,
            "verdict": "pass" if self.passed else "fail",
            "problems": list(self.problems),
            "notes": list(self.notes),
            "plan": asdict(plan),
            "web_server": {
                "sent": load.sent,
                "answered": load.answered,
                "refused": load.refused,
                "failed": load.failed,
                "statuses": {str(status): n for status, n in sorted(load.statuses.items())},
                "errors": dict(load.errors),
                "signal_after": server.signal_after,
                "stopped_after": server.stopped_after,
                "deadline": plan.drill.stop_deadline,
                "exit_status": server.exit_status,
                "claimed": load.claimed if load.answered > load.unclaimed else None,
                "unaccounted": server.unaccounted,
                "report": None if report is None else asdict(report),
            },
            "workers": [asdict(worker) for worker in self.workers],
            "redis": {
                "url": self.target.url,
                "own": self.target.own_port is not None,
                "killed_after": self.redis_killed_after,
                "down_for": self.redis_down_for,
            },
            "remote_tasks": None
            if books is None
            else {
                "claimed": books.claimed,
                "completed": books.completed,
                "lost": list(books.lost),
                "extra_runs": books.extra_runs,
                "unclaimed_runs": books.unclaimed_runs,
                "cut_short": sum(worker.cut_short for worker in self.workers),
                "drained_after": self.drained_after,
            },
            "poison": None if self.poison is None else asdict(self.poison),
            "logs": {name: list(lines) for name, lines in self.logs.items()},
        }


def remote_drill(target: Target, *, json_output: bool) -> int:
    """Run the distributed drill, print its outcome, and return the exit status."""
    return run_and_print(
        partial(run_remote_drill, target),
        format_remote_result,
        json_output=json_output,
        stopped="its processes were stopped",
    )


def run_remote_drill(target: Target, progress: Progress) -> RemoteDrillResult:
    """Start Redis (unless given), the workers and the web server; load, break and
    stop them; check the books. Runs its own trio loop; no process it started outlives
    it. Raises `DrillInterrupted` if the drill itself gets SIGINT or SIGTERM."""
    plan = target.plan
    with tempfile.TemporaryDirectory(prefix="trio_bg-remote-drill-") as name:
        directory = Path(name)
        run = trio.run(_drive, target, progress, directory)
        if run.interrupted_by is not None:
            raise DrillInterrupted(f"the drill was interrupted by {run.interrupted_by}")
        report = None
        if run.stopped_after is not None:
            report = _read_report(directory / "report.json", run.problems)
        ledger = _Ledger.parse(_ledger(directory / "ledger"))
    server = DrillResult(
        plan=plan.drill,
        load=run.load,
        report=report,
        exit_status=run.server_exit,
        signal_after=run.signal_after,
        stopped_after=run.stopped_after,
        problems=tuple(run.problems),
        notes=(),
        server_log_tail=(),
    )
    problems, notes = _check_books(server)
    for worker in run.workers:
        worker.ran = ledger.ran_by(worker.pid)
        worker.cut_short = ledger.unfinished_by(worker.pid)
    books = ledger.books(run.load) if run.signal_after is not None else None
    more_problems, more_notes = _remote_problems(plan, run, books, report)
    return RemoteDrillResult(
        target=target,
        server=server,
        workers=tuple(run.workers),
        redis_killed_after=run.redis_killed_after,
        redis_down_for=run.redis_down_for,
        drained_after=run.drained_after,
        poison=run.poison,
        books=books,
        problems=problems + tuple(more_problems),
        notes=notes + tuple(more_notes),
        logs=run.logs,
    )


@dataclass(kw_only=True)
class _Run:
    """What driving the processes produced, before the books are checked."""

    load: Load = field(default_factory=Load)
    problems: list[str] = field(default_factory=list)
    workers: list[WorkerRun] = field(default_factory=list)
    signal_after: float | None = None
    stopped_after: float | None = None
    server_exit: int | None = None
    redis_killed_after: float | None = None
    redis_down_for: float | None = None
    redis_lost: bool = False
    drained_after: float | None = None
    timed_out_draining: bool = False
    poison: Poison | None = None
    blamed: list[_Child] = field(default_factory=list)
    """The processes that failed: their last lines go in the result."""
    logs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    interrupted_by: str | None = None

    def interrupt(self, signal_name: str) -> None:
        self.interrupted_by = signal_name


@dataclass(frozen=True, eq=False)
class _Child:
    """A process of the drill's; ``ready`` is set by the first line of its output
    saying so, ``ended`` once its output ends (it exited); ``tail`` keeps its last
    lines above INFO."""

    name: str
    process: trio.Process
    ready: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))


class _Processes:
    """Every process the drill started, and the nursery that reads their output."""

    def __init__(self, nursery: trio.Nursery, run: _Run, env: dict[str, str]) -> None:
        self._nursery = nursery
        self._run = run
        self._env = env
        self.started: list[_Child] = []

    async def start(self, name: str, command: list[str], ready: str | None = None) -> _Child:
        """Start ``command``; its output (stdout and stderr) is read line by line."""
        process = await trio.lowlevel.open_process(
            command,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl+C meant for the drill is not theirs
        )
        child = _Child(name, process)
        self.started.append(child)
        self._nursery.start_soon(self._read, child, ready)
        return child

    async def _read(self, child: _Child, ready: str | None) -> None:
        assert child.process.stdout is not None
        pending = b""
        try:
            async with child.process.stdout as output:
                while data := await output.receive_some():
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        _take(child, line, ready)
            if pending:
                _take(child, pending, ready)
        finally:
            child.ended.set()

    async def wait_ready(self, child: _Child) -> str | None:
        """Wait until ``child`` says it is ready; return a problem, or None."""
        with trio.move_on_after(STARTUP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for event in (child.ready, child.ended):
                    nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)
        if child.ready.is_set():
            return None
        self.blame(child)
        if child.ended.is_set():
            with trio.move_on_after(KILL_WAIT):
                status = await child.process.wait()
                return f"{child.name} exited during startup ({describe_exit(status)})"
        return f"{child.name} did not start within {STARTUP_TIMEOUT:g}s"

    def blame(self, child: _Child) -> None:
        """Show ``child``'s last lines with the outcome: it failed."""
        if child not in self._run.blamed:
            self._run.blamed.append(child)

    async def stop_all(self) -> None:
        """Kill whatever still runs, and wait for it (shielded, bounded); keep the last
        lines of those that failed."""
        for child in self.started:
            await _reap(child.process)
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT):
            for child in self._run.blamed:
                await child.ended.wait()  # every line read
        for child in self._run.blamed:
            self._run.logs[f"{child.name} (pid {child.process.pid})"] = tuple(child.tail)


def _take(child: _Child, raw: bytes, ready: str | None) -> None:
    line = raw.decode(errors="replace").rstrip()
    if ready is not None and ready in line:
        child.ready.set()
    if not _CHATTER.match(line):
        child.tail.append(line)


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _drive(target: Target, progress: Progress, directory: Path) -> _Run:
    """Drive the processes; a SIGINT or SIGTERM to the drill stops it (and them)."""
    run = _Run()
    env = os.environ | {REDIS_ENV: target.url, LEDGER_ENV: str(directory / "ledger")}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_interrupt_on_signal, signals, nursery.cancel_scope, run.interrupt)
            processes = _Processes(nursery, run, env)
            try:
                await _drive_processes(target, progress, directory, run, processes)
            finally:
                await processes.stop_all()
            nursery.cancel_scope.cancel()
    return run


async def _drive_processes(
    target: Target, progress: Progress, directory: Path, run: _Run, processes: _Processes
) -> None:
    plan = target.plan
    redis = _Redis(target, directory, processes)
    if target.own_port is not None:
        if problem := await redis.start():
            run.problems.append(problem)
            return
        progress.milestone(f"drill: Redis on 127.0.0.1:{target.own_port} (pid {redis.pid})")
    elif problem := await _reachable(target):
        run.problems.append(problem)
        return

    # The workers and the web server start side by side: a worker is ready (it may not
    # have reached Redis yet) long before it could miss a task, which waits in Redis.
    workers = [
        await processes.start(f"worker {number}", plan.worker_command(), WORKER_READY)
        for number in range(1, plan.workers + 1)
    ]
    run.workers = [WorkerRun(pid=worker.process.pid) for worker in workers]
    port = _free_port()
    server = await processes.start(
        "the web server", plan.server_command(port, directory / "report.json")
    )
    for worker in workers:
        if problem := await processes.wait_ready(worker):
            run.problems.append(problem)
            return
    pids = ", ".join(str(worker.process.pid) for worker in workers)
    progress.milestone(f"drill: {len(workers)} streaq workers run {plan.streaq} (pids {pids})")
    if problem := await _wait_until_listening(server.process, port):
        run.problems.append(f"the web server: {problem}")
        processes.blame(server)
        return
    progress.milestone(
        f"drill: serving {plan.drill.app} on 127.0.0.1:{port} (pid {server.process.pid})"
    )

    async def break_things() -> None:
        start = trio.current_time()
        if plan.kill_redis:
            await _part_of_the_load(plan.drill, run.load, start, 0.25)
            killed = trio.current_time()
            run.redis_killed_after = killed - start
            await redis.kill()
            progress.milestone(f"drill: Redis killed (SIGKILL) after {killed - start:.2f}s of load")
            await _part_of_the_load(plan.drill, run.load, start, 0.5)
            if problem := await redis.start():
                run.problems.append(f"Redis did not come back: {problem}")
                run.redis_lost = True
                return
            run.redis_down_for = trio.current_time() - killed
            progress.milestone(f"drill: Redis started again, after {run.redis_down_for:.2f}s down")
        if plan.poison:
            await _part_of_the_load(plan.drill, run.load, start, 0.6 if plan.kill_redis else 0.4)
            await _plant_poison(target, run, trio.current_time() - start, progress)
        if plan.kill_worker:
            await _part_of_the_load(plan.drill, run.load, start, 0.75 if plan.kill_redis else 0.5)
            _kill_a_worker(
                workers, run, directory / "ledger", trio.current_time() - start, progress
            )

    run.signal_after, run.stopped_after = await _load_and_stop(
        plan.drill, server.process, port, run.load, progress, alongside=break_things
    )
    await _reap(server.process)
    run.server_exit = server.process.returncode
    if run.server_exit not in (0, 1):
        processes.blame(server)
    if run.stopped_after is None:
        run.problems.append(
            f"the web server did not stop within {plan.drill.stop_deadline:g}s of SIGTERM (it "
            f"was killed); if that is shorter than its grace period, raise --deadline"
        )
    if not run.redis_lost:
        run.drained_after = await _drain(target, run, directory / "ledger", progress)
        if run.drained_after is None and run.timed_out_draining:
            for worker in workers:
                processes.blame(worker)
        if run.poison is not None:
            await _wait_set_aside(target, run, run.poison, progress)
    await _stop_workers(target, workers, run, processes, progress)
    await redis.stop()


async def _part_of_the_load(plan: DrillPlan, load: Load, start: float, part: float) -> None:
    """Return once ``part`` of the load is behind: of the seconds before SIGTERM, or of
    the requests."""
    with trio.move_on_at(start + part * plan.signal_after):
        # The clients count in this thread, and tell no one: looked at every few ms.
        while load.sent < part * plan.requests:  # noqa: ASYNC110
            await trio.sleep(0.01)


class _Redis:
    """The drill's own ``redis-server``: persistent (each write synced to the disk
    before Redis answers it), so it can be killed and started again, holding all it
    acknowledged; or, unless the plan says so, keeping nothing across a restart."""

    def __init__(self, target: Target, directory: Path, processes: _Processes) -> None:
        self._target = target
        self._directory = directory / "redis"
        self._directory.mkdir()
        self._processes = processes
        self._child: _Child | None = None

    @property
    def pid(self) -> int | None:
        """The running server's pid."""
        return None if self._child is None else self._child.process.pid

    async def start(self) -> str | None:
        """Start it, and wait until it accepts connections; return a problem, or None."""
        command = [
            "redis-server",
            "--port", str(self._target.own_port),
            "--bind", "127.0.0.1",
            "--dir", str(self._directory),
            "--save", "",
            "--appendonly", "yes" if self._target.plan.redis_persists else "no",
            "--appendfsync", "always",
            "--logfile", "",
            "--daemonize", "no",
        ]  # fmt: skip
        self._child = await self._processes.start("redis", command, REDIS_READY)
        return await self._processes.wait_ready(self._child)

    async def kill(self) -> None:
        """SIGKILL it, and wait for it."""
        if self._child is not None:
            await _reap(self._child.process)
            self._child = None

    async def stop(self) -> None:
        """SIGTERM it, and wait for it (killed if it lingers)."""
        if self._child is not None:
            self._child.process.terminate()
            with trio.move_on_after(KILL_WAIT):
                await self._child.process.wait()
            await self.kill()


async def _reachable(target: Target) -> str | None:
    """None if the plan's Redis answers; else the problem."""
    with trio.move_on_after(STARTUP_TIMEOUT):
        try:
            async with _sender(target.worker) as worker:
                await worker.queue_size()
        except Exception as error:  # (whatever coredis raised, in streaq's groups)
            return f"cannot reach Redis at {target.url}: {_describe(error)}"
        return None
    return f"Redis at {target.url} did not answer within {STARTUP_TIMEOUT:g}s"


def _sender(worker: Worker[Any]) -> Worker[Any]:
    """A twin of ``worker`` with a connection of its own (a worker is entered once)."""
    from .streaq import _Worker

    assert isinstance(worker, _Worker)  # (load_streaq_worker checked it)
    return worker._sender()


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"


def _kill_a_worker(
    workers: list[_Child], run: _Run, ledger: Path, after: float, progress: Progress
) -> None:
    """SIGKILL the worker running the most remote tasks (per the ledger), or the first."""
    now = _Ledger.parse(_ledger(ledger))
    alive = [
        (worker, record)
        for worker, record in zip(workers, run.workers, strict=True)
        if worker.process.returncode is None
    ]
    if not alive:
        run.problems.append("no worker was left to kill")
        return
    worker, record = max(alive, key=lambda pair: now.unfinished_by(pair[1].pid))
    worker.process.kill()
    record.killed_after = after
    progress.milestone(
        f"drill: SIGKILL sent to worker {record.pid} after {after:.2f}s of load; it was "
        f"running {now.unfinished_by(record.pid)} remote task(s)"
    )


async def _drain(target: Target, run: _Run, ledger: Path, progress: Progress) -> float | None:
    """Wait until every claimed task ran, or the queue is empty with some that did not
    (they never will); return the seconds it took, or None if not all ran."""
    claimed = set(run.load.remote)
    idle_timeout = target.worker.idle_timeout / 1000
    deadline = 2 * idle_timeout + DRAIN_MARGIN
    progress.milestone(
        f"drill: waiting up to {deadline:g}s for the workers to run the {len(claimed)} remote "
        f"task(s) the answered requests named (a killed worker's go to another after its "
        f"idle timeout, {idle_timeout:g}s)"
    )
    begun = trio.current_time()
    ran = 0
    all_ran: bool | None = None  # False: the queue is empty, and some never ran
    failure: BaseException | None = None

    def render() -> str:
        return f"{trio.current_time() - begun:5.1f}s  remote tasks: {ran}/{len(claimed)} ran"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress.run, render)
        with trio.move_on_after(deadline):
            while all_ran is None:
                try:
                    async with _sender(target.worker) as queue:
                        # The ledger is a file other processes append to: nothing to wait on.
                        while all_ran is None:
                            # The queue first: a task leaves it after its run is noted.
                            empty = await queue.queue_size() == 0
                            runs = _Ledger.parse(_ledger(ledger)).runs
                            ran = sum(1 for key in claimed if runs[key])
                            if ran == len(claimed) or empty:
                                all_ran = ran == len(claimed)
                            else:
                                await trio.sleep(POLL)
                except Exception as error:  # Redis failed: look again
                    failure = error
                    await trio.sleep(POLL)
        nursery.cancel_scope.cancel()
    took = trio.current_time() - begun
    if all_ran:
        progress.milestone(
            f"drill: every claimed remote task ran, {took:.2f}s after the web server stopped"
        )
        return took
    if all_ran is None:
        problem = f"the workers did not run every claimed remote task within {deadline:g}s"
        if failure is not None:
            problem += f" (the last error from Redis: {_describe(failure)})"
        run.problems.append(problem)
        run.timed_out_draining = True
    else:
        progress.milestone(
            f"drill: the queue is empty after {took:.2f}s; {len(claimed) - ran} claimed "
            f"task(s) never ran"
        )
    return None


async def _plant_poison(target: Target, run: _Run, after: float, progress: Progress) -> None:
    """Put a record no sender writes in the queue, as streaq's ``publish_task`` puts a
    task's: valid JSON, of a task's shape but with no arguments (``"a"``)."""
    from streaq.utils import now_ms

    task_id = f"poisoned-{uuid.uuid4().hex}"
    record = json.dumps({"f": POISON_NAME, "k": {}, "t": now_ms()})
    try:
        async with _sender(target.worker) as worker:
            await worker.redis.set(worker.task_key + task_id, record)
            await worker.redis.xadd(
                worker.stream_key + worker.priorities[-1],
                {"task_id": task_id, "enqueue_time": now_ms()},
            )
    except Exception as error:  # (whatever coredis raised, in streaq's groups)
        run.problems.append(f"cannot plant the poisoned record: {_describe(error)}")
        return
    run.poison = Poison(task_id=task_id, planted_after=after)
    progress.milestone(f"drill: poisoned record {task_id} planted after {after:.2f}s of load")


async def _wait_set_aside(target: Target, run: _Run, poison: Poison, progress: Progress) -> None:
    """Wait until a worker recorded the poisoned record as failed (set aside)."""
    deadline = 2 * target.worker.idle_timeout / 1000 + DRAIN_MARGIN
    raw = None
    try:
        with trio.move_on_after(deadline):
            async with _sender(target.worker) as worker:
                key = worker.results_key + poison.task_id
                # Nothing tells when a worker has set it aside: its result is looked for.
                while (raw := await worker.redis.get(key)) is None:  # noqa: ASYNC110
                    await trio.sleep(POLL)
    except Exception as error:  # (whatever coredis raised, in streaq's groups)
        run.problems.append(f"cannot read the poisoned record's result: {_describe(error)}")
        return
    if raw is None:
        run.problems.append(
            f"no worker set the poisoned record {poison.task_id} aside within {deadline:g}s"
        )
        return
    result = json.loads(raw)["r"]
    poison.error = f"{result['error']}: {result['message']}"
    progress.milestone(f"drill: the poisoned record was set aside ({poison.error})")


async def _stop_workers(
    target: Target, workers: list[_Child], run: _Run, processes: _Processes, progress: Progress
) -> None:
    """SIGTERM the workers still running, and wait for them; note how each ended."""
    deadline = target.worker.grace_period + STOP_MARGIN
    for worker, record in zip(workers, run.workers, strict=True):
        if worker.process.returncode is None:
            worker.process.terminate()
        elif record.killed_after is None:
            processes.blame(worker)
            run.problems.append(
                f"worker {record.pid} ended on its own ({describe_exit(worker.process.returncode)})"
            )
    for worker, record in zip(workers, run.workers, strict=True):
        with trio.move_on_after(deadline):
            await worker.process.wait()
        if worker.process.returncode is None:
            run.problems.append(f"worker {record.pid} did not stop within {deadline:g}s of SIGTERM")
            await _reap(worker.process)
        record.exit_status = worker.process.returncode
        if record.killed_after is None and record.exit_status != 0:
            processes.blame(worker)
    statuses = ", ".join(
        describe_exit(record.exit_status)
        for record in run.workers
        if record.exit_status is not None
    )
    progress.milestone(f"drill: the workers stopped: {statuses}")


@dataclass(frozen=True)
class _Ledger:
    """The ledger's lines: ``KEY started PID`` when a run starts, ``KEY ran PID`` (or
    ``KEY``) when it ends."""

    runs: Counter[str]
    """Ended runs, by task key."""
    started: Counter[tuple[str, int]]
    ended: Counter[tuple[str, int]]

    @classmethod
    def parse(cls, lines: Counter[str]) -> _Ledger:
        """Read the ledger's ``lines`` (counted)."""
        runs: Counter[str] = Counter()
        started: Counter[tuple[str, int]] = Counter()
        ended: Counter[tuple[str, int]] = Counter()
        for line, count in lines.items():
            match line.split():
                case [key, "started", pid] if pid.isdigit():
                    started[key, int(pid)] += count
                case [key, "ran", pid] if pid.isdigit():
                    ended[key, int(pid)] += count
                    runs[key] += count
                case [key, *_]:
                    runs[key] += count
        return cls(runs, started, ended)

    def ran_by(self, pid: int) -> int:
        """Runs that ended in process ``pid``."""
        return sum(count for (_, by), count in self.ended.items() if by == pid)

    def unfinished_by(self, pid: int) -> int:
        """Runs that started in process ``pid`` and did not end there."""
        return sum(
            max(0, count - self.ended[key, by])
            for (key, by), count in self.started.items()
            if by == pid
        )

    def books(self, load: Load) -> RemoteBooks:
        """The remote tasks' books, for what the answered requests named."""
        claimed = set(load.remote)
        lost = tuple(sorted(key for key in claimed if not self.runs[key]))
        return RemoteBooks(
            claimed=len(claimed),
            completed=len(claimed) - len(lost),
            lost=lost,
            extra_runs=sum(self.runs[key] - 1 for key in claimed if self.runs[key] > 1),
            unclaimed_runs=sum(n for key, n in self.runs.items() if key not in claimed),
        )


def _remote_problems(
    plan: RemotePlan, run: _Run, books: RemoteBooks | None, report: ShutdownReport | None
) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []
    if books is not None:
        if books.claimed == 0:
            problems.append(
                f"no answered response named a remote task ({REMOTE_HEADER}): there was "
                f"nothing to check; does the app hand remote tasks off when {REDIS_ENV} is set?"
            )
        if books.lost:
            problems.append(
                f"{len(books.lost)} remote task(s) named by answered requests never ran to the "
                f"end: {', '.join(books.lost[:10])}{' ...' if len(books.lost) > 10 else ''}"
            )
            if report is not None and report.outbox:
                notes.append(
                    f"the web server left {report.outbox} remote task(s) in its journal at "
                    f"its shutdown, not yet handed to Redis (they go at its next start, which "
                    f"the drill does not run): give it a longer --grace-period"
                )
    killed = [worker for worker in run.workers if worker.killed_after is not None]
    if plan.kill_worker and run.signal_after is not None and not killed:
        problems.append("no worker was killed")
    for worker in killed:
        if worker.exit_status not in (None, -signal.SIGKILL):
            problems.append(f"worker {worker.pid} outlived its SIGKILL")
        if worker.cut_short == 0 and books is not None:
            notes.append(
                f"worker {worker.pid} was running no remote task when it was killed: the "
                f"kill tested nothing (send more load, or a longer --signal-after)"
            )
    for worker in run.workers:
        if worker.killed_after is None and worker.exit_status not in (None, 0):
            problems.append(f"worker {worker.pid} exited with {describe_exit(worker.exit_status)}")
    return problems, notes


# -- the table -----------------------------------------------------------------------


def format_remote_result(result: RemoteDrillResult) -> str:
    """The distributed drill's outcome as a table, for people."""
    target, server, books = result.target, result.server, result.books
    plan, load, report = target.plan, server.load, server.report
    drill = plan.drill
    title = (
        f"trio_bg distributed drill of {drill.app}: {drill.requests} requests from "
        f"{drill.concurrency} clients{f' at {drill.rate:g}/s' if drill.rate else ''}, SIGTERM "
        f"after {drill.signal_after:g}s, {plan.workers} streaq workers"
    )
    if plan.kill_worker:
        title += ", one SIGKILLed mid-load"
    if plan.kill_redis:
        title += ", Redis restarted mid-load"
        if not plan.redis_persists:
            title += " without its data"
    if plan.poison:
        title += ", a poisoned record planted mid-load"
    if drill.journal is not None:
        title += f", journal {drill.journal}"
    lines = [title, ""]
    row = row_writer(lines, 26)

    lines.append("  web server")
    request_rows(row, load, drill.requests, sent="requests sent")
    if server.signal_after is not None:
        row("SIGTERM after", f"{server.signal_after:.2f}s", "of load")
    if report is None:
        row("accepted", "?", "no report from the web server")
    else:
        row("accepted", report.accepted, "tasks, local and remote")
        row("handed off", report.handed_off, "remote tasks Redis acknowledged")
        row("discarded", report.discarded, "their request failed (503, error); never ran")
        if report.unconfirmed:
            row(
                "unconfirmed",
                report.unconfirmed,
                "their request failed, Redis did not answer; may run",
            )
        if report.resent:
            row("handed off again", report.resent, "from the journal, after Redis lost them")
        if report.maybe_lost:
            row("perhaps lost", report.maybe_lost, "Redis lost them, no journal kept them")
        remote = f", {report.outbox} of them remote" if report.outbox else ""
        row("deferred", report.deferred, f"left in the journal for its next start{remote}")
        row("unaccounted", server.unaccounted)
    if server.stopped_after is not None:
        row(
            "stopped after",
            f"{server.stopped_after:.2f}s",
            f"{_grace(drill)}; exit status {server.exit_status}",
        )

    lines.append(f"  streaq workers ({plan.streaq})")
    row("started", len(result.workers))
    for worker in result.workers:
        ended = "" if worker.exit_status is None else describe_exit(worker.exit_status)
        if worker.killed_after is not None:
            ended = f"SIGKILL after {worker.killed_after:.2f}s of load"
        comment = "ran" + (f", {worker.cut_short} cut short" if worker.cut_short else "")
        row(f"worker {worker.pid}", worker.ran, f"{comment}; {ended}" if ended else comment)

    lines.append(f"  Redis ({'its own, ' if target.own_port else ''}{target.url})")
    if result.redis_killed_after is not None:
        row("restarted after", f"{result.redis_killed_after:.2f}s", "of load (SIGKILL)")
    if result.redis_down_for is not None:
        row("down for", f"{result.redis_down_for:.2f}s", "until it took connections again")
    if not plan.kill_redis:
        row("restarted", "no", "(--kill-redis restarts it mid-load)")

    if books is not None:
        lines.append("  remote tasks")
        row("claimed by answers", books.claimed, f"named in {REMOTE_HEADER}")
        row("completed at least once", books.completed)
        row("lost", len(books.lost))
        row("extra runs", books.extra_runs, "at least once: run again after a kill")
        row("ran, unclaimed", books.unclaimed_runs, "handed off, but the answer was not received")
        if result.drained_after is not None:
            row("all claimed ran", f"{result.drained_after:.2f}s", "after the web server stopped")
    if result.poison is not None:
        poison = result.poison
        lines.append("  poisoned record")
        row("planted after", f"{poison.planted_after:.2f}s", f"of load: {poison.task_id}")
        row("set aside", "yes" if poison.error else "no", poison.error or "")
    lines.append("")
    for note in result.notes:
        lines.append(f"  note: {note}")
    for problem in result.problems:
        lines.append(f"  PROBLEM: {problem}")
    for name, tail in result.logs.items():
        lines.append(f"  the last warnings and errors of {name}:")
        lines.extend(f"    | {line}" for line in tail)
    verdict = (
        "PASS: every remote task an answered request named completed at least once"
        if result.passed
        else f"FAIL: {len(result.problems)} problem(s)"
    )
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)
