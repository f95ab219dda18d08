"""The distributed drill: a web server hands remote tasks to streaq workers over Redis;
under load one worker is SIGKILLed (and Redis restarted), then the web server gets
SIGTERM; once the workers drained, every remote task an answered request named must
have completed at least once. With ``poison``, a poisoned record planted mid-load must
be set aside, and no worker die of it."""

from __future__ import annotations

import json
import os
import signal
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..._engine.report import ShutdownReport
from ..._running.values import describe_error
from ..supervisor import describe_exit
from .harness import (
    LEDGER_ENV,
    STARTUP_TIMEOUT,
    Books,
    Ledger,
    Progress,
    drill_directory,
    free_port,
    read_ledger,
    read_report,
    reap,
    run_and_print,
    run_interruptible,
    wait_until_listening,
)
from .load import REMOTE_HEADER, load_and_stop, part_of_the_load
from .processes import Child, Processes, RedisServer
from .remote_plan import (
    REDIS_ENV,
    Poison,
    RemoteDrillResult,
    RemotePlan,
    Target,
    WorkerRun,
    format_remote_result,
)
from .shutdown import DrillResult, ServerRun, stopped_late

if TYPE_CHECKING:
    from streaq import Worker

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
    with drill_directory("trio_bg-remote-drill-") as directory:
        run = run_interruptible(partial(_drive, target, progress, directory))
        report = None
        if run.stopped_after is not None:
            report = read_report(directory / "report.json", run.problems)
        ledger = Ledger.parse(read_ledger(directory / "ledger"))
    server = DrillResult.of(target.plan.drill, run, report)
    for worker in run.workers:
        worker.ran = ledger.ran_by(worker.pid)
        worker.cut_short = ledger.unfinished_by(worker.pid)
    books = Books.of(run.load.remote, ledger.runs) if run.signal_after is not None else None
    more_problems, more_notes = _remote_problems(target.plan, run, books, report)
    return RemoteDrillResult(
        target=target,
        server=server,
        workers=tuple(run.workers),
        redis_killed_after=run.redis_killed_after,
        redis_down_for=run.redis_down_for,
        drained_after=run.drained_after,
        poison=run.poison,
        books=books,
        problems=server.problems + tuple(more_problems),
        notes=server.notes + tuple(more_notes),
        logs=run.logs,
    )


@dataclass(kw_only=True)
class _Run(ServerRun):
    """What driving the processes produced, before the books are checked: the web
    server's part, and the rest."""

    workers: list[WorkerRun] = field(default_factory=list)
    redis_killed_after: float | None = None
    redis_down_for: float | None = None
    redis_lost: bool = False
    drained_after: float | None = None
    timed_out_draining: bool = False
    poison: Poison | None = None
    logs: dict[str, tuple[str, ...]] = field(default_factory=dict)


async def _drive(target: Target, progress: Progress, directory: Path) -> _Run:
    """Drive the processes; whatever happens, they are stopped."""
    run = _Run()
    env = os.environ | {REDIS_ENV: target.url, LEDGER_ENV: str(directory / "ledger")}
    async with trio.open_nursery() as nursery:
        processes = Processes(nursery, env)
        try:
            await _drive_processes(target, progress, directory, run, processes)
        finally:
            await processes.stop_all()
            run.logs = processes.logs
        nursery.cancel_scope.cancel()
    return run


async def _drive_processes(
    target: Target, progress: Progress, directory: Path, run: _Run, processes: Processes
) -> None:
    plan = target.plan
    redis = RedisServer(target.own_port, plan.redis_persists, directory, processes)
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
    port = free_port()
    server = await processes.start(
        "the web server", plan.server_command(port, directory / "report.json")
    )
    for worker in workers:
        if problem := await processes.wait_ready(worker):
            run.problems.append(problem)
            return
    pids = ", ".join(str(worker.process.pid) for worker in workers)
    progress.milestone(f"drill: {len(workers)} streaq workers run {plan.streaq} (pids {pids})")
    if problem := await wait_until_listening(server.process, port):
        run.problems.append(f"the web server: {problem}")
        processes.blame(server)
        return
    progress.milestone(
        f"drill: serving {plan.drill.app} on 127.0.0.1:{port} (pid {server.process.pid})"
    )

    async def break_things() -> None:
        start = trio.current_time()
        if plan.kill_redis:
            await part_of_the_load(plan.drill, run.load, start, 0.25)
            killed = trio.current_time()
            run.redis_killed_after = killed - start
            await redis.kill()
            progress.milestone(f"drill: Redis killed (SIGKILL) after {killed - start:.2f}s of load")
            await part_of_the_load(plan.drill, run.load, start, 0.5)
            if problem := await redis.start():
                run.problems.append(f"Redis did not come back: {problem}")
                run.redis_lost = True
                return
            run.redis_down_for = trio.current_time() - killed
            progress.milestone(f"drill: Redis started again, after {run.redis_down_for:.2f}s down")
        if plan.poison:
            await part_of_the_load(plan.drill, run.load, start, 0.6 if plan.kill_redis else 0.4)
            await _plant_poison(target, run, trio.current_time() - start, progress)
        if plan.kill_worker:
            await part_of_the_load(plan.drill, run.load, start, 0.75 if plan.kill_redis else 0.5)
            _kill_a_worker(
                workers, run, directory / "ledger", trio.current_time() - start, progress
            )

    run.signal_after, run.stopped_after = await load_and_stop(
        plan.drill, server.process, port, run.load, progress, alongside=break_things
    )
    await reap(server.process)
    run.exit_status = server.process.returncode
    if run.exit_status not in (0, 1):
        processes.blame(server)
    if run.stopped_after is None:
        run.problems.append(stopped_late("the web server", plan.drill))
    if not run.redis_lost:
        run.drained_after = await _drain(target, run, directory / "ledger", progress)
        if run.drained_after is None and run.timed_out_draining:
            for worker in workers:
                processes.blame(worker)
        if run.poison is not None:
            await _wait_set_aside(target, run, run.poison, progress)
    await _stop_workers(target, workers, run, processes, progress)
    await redis.stop()


async def _reachable(target: Target) -> str | None:
    """None if the plan's Redis answers; else the problem."""
    with trio.move_on_after(STARTUP_TIMEOUT):
        try:
            async with _sender(target.worker) as worker:
                await worker.queue_size()
        except Exception as error:  # (whatever coredis raised, in streaq's groups)
            return f"cannot reach Redis at {target.url}: {describe_error(error)}"
        return None
    return f"Redis at {target.url} did not answer within {STARTUP_TIMEOUT:g}s"


def _sender(worker: Worker[Any]) -> Worker[Any]:
    """A twin of ``worker`` with a connection of its own (a worker is entered once)."""
    from ..._keeping.streaq_worker import TrioWorker, sender_of

    assert isinstance(worker, TrioWorker)  # (load_streaq_worker checked it)
    return sender_of(worker)


def _kill_a_worker(
    workers: list[Child], run: _Run, ledger: Path, after: float, progress: Progress
) -> None:
    """SIGKILL the worker running the most remote tasks (per the ledger), or the first."""
    now = Ledger.parse(read_ledger(ledger))
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
                            runs = Ledger.parse(read_ledger(ledger)).runs
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
            problem += f" (the last error from Redis: {describe_error(failure)})"
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
        run.problems.append(f"cannot plant the poisoned record: {describe_error(error)}")
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
        run.problems.append(f"cannot read the poisoned record's result: {describe_error(error)}")
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
    target: Target, workers: list[Child], run: _Run, processes: Processes, progress: Progress
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
            await reap(worker.process)
        record.exit_status = worker.process.returncode
        if record.killed_after is None and record.exit_status != 0:
            processes.blame(worker)
    statuses = ", ".join(
        describe_exit(record.exit_status)
        for record in run.workers
        if record.exit_status is not None
    )
    progress.milestone(f"drill: the workers stopped: {statuses}")


def _remote_problems(
    plan: RemotePlan, run: _Run, books: Books | None, report: ShutdownReport | None
) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []
    if books is not None:
        problems += books.problems(
            "remote", REMOTE_HEADER, f"hand remote tasks off when {REDIS_ENV} is set"
        )
        if books.lost and report is not None and report.outbox:
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
