"""BackgroundNursery, the public face of a `TaskRunner`: it takes work, shows its
counts, drains and reports; and the opening of one, with its keepers."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, Unpack

import trio

from .._engine.recorder import TaskRecorder
from .._engine.report import ShutdownReport, TaskStats, names_with_counts
from .._engine.status import TaskHandle, TaskState, TaskStatus
from .._engine.tasks import Task
from .._errors import HandoffError, JournalError
from .._keeping.handoff import Handoff
from .._keeping.journal import Journal
from .._keeping.journal_keeper import JournalKeeper
from .._keeping.remote_keeper import RemoteKeeper
from .by_id import TasksById
from .keeper_port import KeeperPort
from .options import NurseryOptions, Settings
from .runner import TaskRunner

if TYPE_CHECKING:
    from collections.abc import Sequence

P = ParamSpec("P")

logger = logging.getLogger("trio_bg")


class BackgroundNursery:
    """A nursery for background work that outlives the requests that started it.

    Open one with `open_background_nursery`. At most ``max_running`` tasks run at
    once; up to ``max_pending`` more wait, in arrival order, as small records (not
    parked trio tasks). ``async def`` functions run as trio tasks; plain functions
    run in the nursery's own pool of ``thread_limit`` worker threads. A task
    that raises is logged, counted as failed and passed to ``on_error``; it never
    affects the other tasks. Shutting down stops admitting, waits up to
    ``grace_period`` seconds for the tasks, cancels what is left, and leaves a
    `ShutdownReport` in `report`.
    """

    __slots__ = ("_report", "_runner", "_shutdown_started", "_trio_thread", "_trio_token")

    def __init__(self, settings: Settings) -> None:
        """Private: use `open_background_nursery`."""
        self._runner = TaskRunner(settings)
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._shutdown_started: float | None = None
        self._report: ShutdownReport | None = None

    # -- taking work ---------------------------------------------------------------

    def start_soon(
        self, func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle:
        """Run ``func(*args, **kwargs)`` in the background, now or once a slot frees,
        and return its `TaskHandle`.

        Checks the call like `BackgroundTasks.add_task` (`TypeError` for a call that
        could never run), and raises `Overloaded` when the nursery is full
        (`NurseryClosed` once shutdown has begun). The task runs in a copy of the
        caller's context. May be called from worker threads too. A task whose
        deduplication key is held (see `task`) is not added: the handle is the
        holder's.
        """
        task = Task(func, args, kwargs)
        duplicate = self._runner.admit(task)
        if duplicate is not None:
            return duplicate
        self._runner.accept((task,))
        return TaskHandle(task.id, task.name)

    def admit(self, task: Task) -> TaskHandle | None:
        """Reserve room for ``task`` or raise `Overloaded`; or return the handle of
        the task that holds its id (part of `TaskSink`)."""
        return self._runner.admit(task)

    def accept(self, tasks: Sequence[Task]) -> None:
        """Run or queue admitted ``tasks`` (part of `TaskSink`)."""
        self._runner.accept(tasks)

    async def commit(self, tasks: Sequence[Task]) -> None:
        """Keep the durable and remote ones of ``tasks`` (part of `TaskSink`)."""
        await self._runner.commit(tasks)

    def discard(self, tasks: Sequence[Task], reason: str) -> None:
        """Release admitted tasks that will never run (part of `TaskSink`)."""
        self._runner.discard(tasks, reason)

    # -- looking on ----------------------------------------------------------------

    @property
    def stats(self) -> TaskStats:
        """The number of tasks in each state, now. Readable from any thread: from a
        worker thread the counts are read in trio's thread, so they always balance."""
        if threading.get_ident() != self._trio_thread:
            with contextlib.suppress(trio.RunFinishedError):  # then nothing changes them
                return trio.from_thread.run_sync(self._stats, trio_token=self._trio_token)
        return self._stats()

    def _stats(self) -> TaskStats:
        runner = self._runner
        books, threads = runner.books, runner.threads
        return TaskStats(
            pending=books.pending + threads.awaiting,
            running=books.running - threads.awaiting,
            reserved=books.in_hand - books.pending - books.running,
            rejected=books.rejected,
            oldest_pending_age=runner.oldest_pending_age(),
            threads_in_use=threads.pool.in_use,
            retrying=books.retrying,
            retried=books.retried,
            **self._counts("recovered", "deferred", "unknown", "resent", "maybe_lost"),
        )

    def _counts(self, *kept: str) -> dict[str, int]:
        """The totals `TaskStats` and `ShutdownReport` share, and those of ``kept``
        that the keepers (the journal's, Redis's) count."""
        keepers: dict[str, int] = {}
        if (journal := self._runner.journal) is not None:
            keepers.update(
                recovered=journal.recovered,
                deferred=journal.deferred,
                unknown=journal.unknown,
                lease_lost=journal.lease_lost,
            )
        if (remote := self._runner.remote) is not None:
            keepers.update(
                outbox=remote.left_in_outbox, resent=remote.resent, maybe_lost=remote.maybe_lost
            )
        return self._runner.books.totals() | {
            name: keepers[name] for name in kept if name in keepers
        }

    @property
    def closed(self) -> bool:
        """True once shutdown has begun: new tasks are refused."""
        return self._runner.closed

    @property
    def report(self) -> ShutdownReport:
        """The `ShutdownReport`, once shutdown has finished (`RuntimeError` before)."""
        if self._report is None:
            raise RuntimeError("the background nursery has not finished shutting down yet")
        return self._report

    async def wait_idle(self) -> None:
        """Return once no task is pending or running, nor being stored in the journal
        (or handed to Redis) to be accepted."""
        await self._runner.books.wait_idle()

    # -- one task ------------------------------------------------------------------

    async def task_status(self, id: str) -> TaskStatus | None:
        """The `TaskStatus` of task ``id``, or None if this nursery does not know it
        (an unknown id, or an ended task whose status is no longer kept)."""
        return await self._runner.by_id.task_status(id)

    async def wait_task(self, id: str, timeout: float | None = None) -> TaskStatus:
        """Return task ``id``'s `TaskStatus` once it has ended: the built-in
        `TimeoutError` after ``timeout`` seconds, `LookupError` for an unknown id."""
        return await self._runner.by_id.wait_task(id, timeout)

    async def cancel_task(self, id: str) -> bool:
        """Cancel task ``id``: True if it was pending, retrying or running and is now
        cancelled (a pending one never runs; counted ``cancelled`` and
        ``cancelled_on_request``); False if it has ended or is unknown, or if it is a
        plain function that a worker thread has started (threads cannot be
        interrupted)."""
        return await self._runner.by_id.cancel_task(id)

    async def list_tasks(
        self, *, state: TaskState | None = None, name: str | None = None, limit: int = 1000
    ) -> list[TaskStatus]:
        """The statuses this nursery keeps, live tasks first, then ended ones oldest
        first, of those in ``state`` and named ``name`` (None: any); at most ``limit``."""
        return await self._runner.by_id.list_tasks(state=state, name=name, limit=limit)

    # -- shutting down -------------------------------------------------------------

    async def shutdown(self) -> ShutdownReport:
        """Stop admitting, wait up to ``grace_period`` for pending and running tasks,
        cancel the rest, and return the `ShutdownReport`. Calling it again (or
        concurrently) returns the same report."""
        runner = self._runner
        if self._shutdown_started is None:
            self._close()
            logger.info(
                "draining background tasks for up to %ss: %d running, %d pending",
                runner.settings.grace_period,
                runner.books.running,
                runner.books.pending,
            )
            try:
                with trio.move_on_after(runner.settings.grace_period):
                    await runner.books.wait_idle()
            finally:
                self.cancel()
        await runner.all_ended.wait()
        return self._finish()

    def cancel(self) -> None:
        """Stop admitting and cancel every task now, without (or ending) the grace
        period. A `shutdown` under way then returns as soon as the tasks have ended.
        """
        self._close()
        self._runner.cancel_rest()

    def _close(self) -> None:
        self._runner.close()
        if self._shutdown_started is None:
            self._shutdown_started = trio.current_time()

    def _finish(self) -> ShutdownReport:
        """Build (once) and log the report; every task has ended."""
        if self._report is None:
            runner = self._runner
            started = self._shutdown_started
            self._report = ShutdownReport(
                unfinished=tuple(runner.unfinished),
                unfinished_ids=tuple(runner.unfinished_ids),
                duration=0.0 if started is None else trio.current_time() - started,
                **self._counts(
                    "deferred", "recovered", "outbox", "resent", "maybe_lost", "lease_lost"
                ),
            )
            log = logger.info if self._report.all_completed else logger.warning
            log("background tasks shut down: %s", self._report)
            if runner.unfinished:
                log("unfinished background tasks: %s", names_with_counts(runner.unfinished))
        return self._report

    async def _shut_down_when_stopped(self, *, raise_fatal: bool) -> None:
        """Once a task raised KeyboardInterrupt or SystemExit, shut down; then raise it
        if asked (it cancels the code around the nursery, as trio would)."""
        await self._runner.stopping.wait()
        fatal = self._runner.onlookers.fatal
        if fatal is None:
            return  # every task ended: the nursery is closing the ordinary way
        await self.shutdown()
        if raise_fatal:
            raise fatal


@asynccontextmanager
async def open_background_nursery(
    **options: Unpack[NurseryOptions],
) -> AsyncIterator[BackgroundNursery]:
    """Open a `BackgroundNursery`; leaving the block shuts it down.

    Options (all keyword, all optional): ``grace_period`` (seconds, default 10),
    ``max_running`` (default 1000), ``max_pending`` (default 10000),
    ``thread_limit`` (worker threads for plain functions, default 40),
    ``on_error`` (``hook(name, exc)``), ``on_event`` (``hook(TaskEvent)``).
    A normal exit runs `BackgroundNursery.shutdown`; an exception in the block
    cancels the tasks at once. Either way `BackgroundNursery.report` is set after.
    A task (or hook) that raises KeyboardInterrupt or SystemExit shuts the nursery
    down (drain, cancel, report) and then has it raised out of the block.
    """
    async with open_nursery(Settings.from_options(options), raise_fatal=True) as nursery:
        yield nursery


@asynccontextmanager
async def open_nursery(
    settings: Settings, *, raise_fatal: bool
) -> AsyncIterator[BackgroundNursery]:
    """`open_background_nursery` with checked settings. Without ``raise_fatal``, a
    KeyboardInterrupt or SystemExit from a task shuts the nursery down and is left in
    `fatal` for the owner (the middleware) to raise when it sees fit."""
    nursery = BackgroundNursery(settings)
    runner = nursery._runner
    port = KeeperPort(runner)
    journal = None
    if settings.journal is not None:
        journal = JournalKeeper(
            await Journal.open(
                os.fspath(settings.journal),
                lease=settings.journal_lease,
                synchronous=settings.journal_synchronous,
                statuses_kept_for=settings.journal_statuses_kept_for,
            ),
            port,
            max_running=settings.max_running,
            max_pending=settings.max_pending,
        )
        runner.journal = journal
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as host_nursery:
            remote = None
            if settings.streaq is not None:
                run = partial(Handoff(settings.streaq).run, patient=journal is not None)
                remote = runner.remote = RemoteKeeper(await host_nursery.start(run), port)
            await host_nursery.start(runner.host)
            if remote is not None:
                runner.nursery.start_soon(remote.watch)
                if journal is not None:
                    journal.keep_remote(remote)
                    runner.nursery.start_soon(remote.forward)
            if journal is not None:
                runner.nursery.start_soon(journal.record_starts)
                await runner.nursery.start(journal.feed)
            host_nursery.start_soon(
                partial(nursery._shut_down_when_stopped, raise_fatal=raise_fatal)
            )
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                nursery.cancel()
                raise
            await nursery.shutdown()
            if remote is not None:
                remote.handoff.close()
    except BaseExceptionGroup as group:
        # trio wraps an error of the block (or the KeyboardInterrupt / SystemExit of a
        # task) in a group; when it is the only error, raise it as itself.
        for own in (body_error, runner.onlookers.fatal):
            if own is not None and group.exceptions == (own,):
                raise own from own.__cause__  # (keeps the original cause)
        if len(group.exceptions) == 1 and isinstance(
            group.exceptions[0], JournalError | HandoffError
        ):
            raise group.exceptions[0] from None  # the journal or Redis failed at startup
        raise
    finally:
        if runner.all_ended.is_set():
            nursery._finish()
        if journal is not None:
            try:
                await journal.journal.close(keep=journal.kept)
            except JournalError as error:  # its rows wait for the lease to expire
                logger.error("%s", error)


# What the package asks of a nursery beyond its public face (its owner: the
# middleware, trio_bg.serve, the test kit), read here, where those attributes live.


def fatal(nursery: BackgroundNursery) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit a task raised (the nursery then shut itself
    down), for its owner to raise when it sees fit; None if none did."""
    return nursery._runner.onlookers.fatal


async def stopping(nursery: BackgroundNursery) -> None:
    """Return once every task has ended, or a task raised KeyboardInterrupt or
    SystemExit (see `fatal`)."""
    await nursery._runner.stopping.wait()


async def wait_drained(nursery: BackgroundNursery) -> None:
    """Return once no task is pending or running, nor admitted by a request still in
    flight (whose tasks are not handed off yet)."""
    await nursery._runner.books.wait_drained()


def watch_failures(
    nursery: BackgroundNursery, watchers: Iterable[Callable[[str, BaseException], object]]
) -> None:
    """Have ``watchers`` told ``(name, error)`` of every task that fails (the test kit
    fails the test)."""
    nursery._runner.onlookers.watchers.extend(watchers)


def remote_keeper(nursery: BackgroundNursery) -> RemoteKeeper | None:
    """The keeper of ``nursery``'s remote tasks (the Redis forwarder), if it has one."""
    return nursery._runner.remote


def tasks_by_id(nursery: BackgroundNursery) -> TasksById:
    """``nursery``'s tasks by id (what the module functions ask)."""
    return nursery._runner.by_id


def record_tasks(nursery: BackgroundNursery) -> TaskRecorder:
    """``nursery``'s recorder (per-name outcomes, run and wait times, the timeline of
    the last minutes), made on the first call: till then nothing is recorded."""
    onlookers = nursery._runner.onlookers
    if onlookers.recorder is None:
        onlookers.recorder = TaskRecorder()
    return onlookers.recorder


def journal_of(nursery: BackgroundNursery) -> Journal | None:
    """``nursery``'s journal, if it has one (the dashboard and the metrics count its
    rows, and list, retry and purge its dead letters)."""
    keeper = nursery._runner.journal
    return None if keeper is None else keeper.journal


async def retry_dead_letters(nursery: BackgroundNursery, ids: Sequence[int | str]) -> int:
    """Queue the dead letters of ``ids`` (row or task ids) in ``nursery``'s journal
    again, and wake its feeder, so that they run now rather than at its next poll; how
    many were queued (0 without a journal)."""
    keeper = nursery._runner.journal
    if keeper is None:
        return 0
    count = await keeper.journal.requeue(ids)
    if count:
        keeper.wake.set()
    return count


def settings_of(nursery: BackgroundNursery) -> Settings:
    """``nursery``'s options, checked, with their defaults filled in."""
    return nursery._runner.settings


def newest_ended(
    nursery: BackgroundNursery, limit: int, state: TaskState | None = None, name: str | None = None
) -> list[TaskStatus]:
    """The statuses of ``nursery``'s last ``limit`` tasks to end, newest first, of those
    in ``state`` and named ``name`` (None: any): what the dashboard lists as recently
    ended, without building every status kept."""
    return nursery._runner.statuses.newest_ended(limit, state, name)
