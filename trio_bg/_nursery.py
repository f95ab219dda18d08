"""BackgroundNursery: runs accepted tasks, counts their states, drains and cancels."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, Unpack

import trio

from ._errors import NurseryClosed
from ._options import NurseryOptions, Settings
from ._report import ShutdownReport, TaskStats
from ._tasks import Task

P = ParamSpec("P")

logger = logging.getLogger("trio_bg")


class BackgroundNursery:
    """A nursery for background work that outlives the requests that started it.

    Open one with `open_background_nursery`. ``async def`` functions run as trio
    tasks; plain functions run in worker threads under the nursery's own
    `trio.CapacityLimiter`. A task that raises is logged, counted as failed and
    passed to ``on_error``; it never affects the other tasks. Shutting down stops
    admitting, waits up to ``grace_period`` seconds for the running tasks, cancels
    what is left, and leaves a `ShutdownReport` in `report`.
    """

    def __init__(self, settings: Settings) -> None:
        """Private: use `open_background_nursery`."""
        self._settings = settings
        self._nursery: trio.Nursery  # set by _host; its cancel scope covers the tasks only
        self._limiter = trio.CapacityLimiter(settings.thread_limit)
        self._closed = False
        self._all_ended = trio.Event()
        self._idle: trio.Event | None = None
        self._shutdown_started: float | None = None
        self._report: ShutdownReport | None = None
        self._unfinished: list[str] = []
        self._accepted = self._pending = self._running = 0
        self._completed = self._failed = self._cancelled = self._abandoned = 0
        self._discarded = 0

    # -- taking work ---------------------------------------------------------------

    def start_soon(self, func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Start ``func(*args, **kwargs)`` in the background now.

        Checks the call like `BackgroundTasks.add_task` (`TypeError` for a call
        that could never run) and raises `NurseryClosed` once shutdown has begun.
        The task runs in a copy of the caller's context.
        """
        task = Task(func, args, kwargs)
        self.admit(task)
        self.accept((task,))

    def admit(self, task: Task) -> None:
        """Raise `NurseryClosed` if no new task can be taken (part of `TaskSink`)."""
        if self._closed:
            raise NurseryClosed(
                f"the background nursery is shutting down and takes no new tasks "
                f"(refused: {task.name})"
            )

    def accept(self, tasks: Sequence[Task]) -> None:
        """Start running ``tasks`` (part of `TaskSink`)."""
        if self._closed:
            raise NurseryClosed("the background nursery is shutting down and takes no new tasks")
        for task in tasks:
            self._accepted += 1
            self._pending += 1
            # Spawned from inside the task's context, the trio task gets a copy of it.
            task.context.run(self._spawn, task)

    def _spawn(self, task: Task) -> None:
        self._nursery.start_soon(self._run, task, name=task.name)

    def discard(self, tasks: Sequence[Task], reason: str) -> None:
        """Count and log tasks that will never run (part of `TaskSink`)."""
        self._discarded += len(tasks)
        logger.warning(
            "discarded %d background task(s) (%s): %s",
            len(tasks),
            reason,
            ", ".join(task.name for task in tasks),
        )

    # -- looking on ----------------------------------------------------------------

    @property
    def stats(self) -> TaskStats:
        """The number of tasks in each state, now."""
        return TaskStats(
            accepted=self._accepted,
            pending=self._pending,
            running=self._running,
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
            abandoned=self._abandoned,
            discarded=self._discarded,
        )

    @property
    def closed(self) -> bool:
        """True once shutdown has begun: new tasks are refused."""
        return self._closed

    @property
    def report(self) -> ShutdownReport:
        """The `ShutdownReport`, once shutdown has finished (`RuntimeError` before)."""
        if self._report is None:
            raise RuntimeError("the background nursery has not finished shutting down yet")
        return self._report

    async def wait_idle(self) -> None:
        """Return once no task is pending or running."""
        while self._pending or self._running:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()
        await trio.lowlevel.checkpoint()

    # -- shutting down -------------------------------------------------------------

    async def shutdown(self) -> ShutdownReport:
        """Stop admitting, wait up to ``grace_period`` for the running tasks, cancel
        the rest, and return the `ShutdownReport`. Calling it again returns the same
        report."""
        if self._shutdown_started is None:
            self._closed = True
            self._shutdown_started = trio.current_time()
            try:
                with trio.move_on_after(self._settings.grace_period):
                    await self.wait_idle()
            finally:
                self._nursery.cancel_scope.cancel()
        await self._all_ended.wait()
        return self._finish()

    def _cancel_now(self) -> None:
        """Refuse new tasks and cancel the running ones, with no grace period."""
        self._closed = True
        if self._shutdown_started is None:
            self._shutdown_started = trio.current_time()
        self._nursery.cancel_scope.cancel()

    def _finish(self) -> ShutdownReport:
        """Build the report, once every task has ended."""
        if self._report is None:
            started = self._shutdown_started
            self._report = ShutdownReport(
                accepted=self._accepted,
                completed=self._completed,
                failed=self._failed,
                cancelled=self._cancelled,
                abandoned=self._abandoned,
                discarded=self._discarded,
                unfinished=tuple(self._unfinished),
                duration=0.0 if started is None else trio.current_time() - started,
            )
            log = logger.info if self._report.all_completed else logger.warning
            log("background tasks shut down: %s", self._report)
            if self._unfinished:
                log("unfinished background tasks: %s", ", ".join(self._unfinished))
        return self._report

    # -- running one task ----------------------------------------------------------

    async def _run(self, task: Task) -> None:
        self._pending -= 1
        self._running += 1
        try:
            # A task the shutdown cancelled before it was scheduled never starts.
            await trio.lowlevel.checkpoint_if_cancelled()
            if task.is_async:
                await task.func(*task.args, **task.kwargs)
            else:
                await self._run_in_thread(task)
        except BaseException as exc:
            self._running -= 1
            if not _is_cancellation(exc):
                self._failed += 1
                self._report_failure(task, exc)
                if isinstance(exc, Exception):
                    return
            elif task.thread_started:
                self._abandoned += 1
                self._unfinished.append(task.name)
            else:
                self._cancelled += 1
                self._unfinished.append(task.name)
            raise  # Cancelled, KeyboardInterrupt and their kind are never swallowed
        else:
            self._running -= 1
            self._completed += 1
        finally:
            if self._idle is not None and not (self._pending or self._running):
                self._idle.set()

    async def _run_in_thread(self, task: Task) -> None:
        def call() -> object:
            task.thread_started = True
            return task.func(*task.args, **task.kwargs)

        # abandon_on_cancel: a thread cannot be interrupted; at the end of the grace
        # period we stop waiting for it and report it as abandoned.
        result = await trio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"{task.name} returned an awaitable from a worker thread, so nothing awaited "
                f"it; define it with async def to run it as a trio task"
            )

    def _report_failure(self, task: Task, exc: BaseException) -> None:
        logger.error("background task %s failed", task.name, exc_info=exc)
        hook = self._settings.on_error
        if hook is None:
            return
        try:
            hook(task.name, exc)
        except Exception:
            logger.exception("the on_error hook failed for background task %s", task.name)

    async def _host(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the tasks' nursery, so that its cancel scope covers the tasks only."""
        try:
            async with trio.open_nursery() as self._nursery:
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._all_ended.set()


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is trio's cancellation (alone, or a group of nothing else)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


@asynccontextmanager
async def open_background_nursery(
    **options: Unpack[NurseryOptions],
) -> AsyncIterator[BackgroundNursery]:
    """Open a `BackgroundNursery`; leaving the block shuts it down.

    Options: ``grace_period`` (seconds, default 10), ``thread_limit`` (worker
    threads for plain functions, default 40), ``on_error`` (``hook(name, exc)``).
    A normal exit runs `BackgroundNursery.shutdown`; an exception in the block
    cancels the tasks at once. Either way `BackgroundNursery.report` is set after.
    """
    nursery = BackgroundNursery(Settings.from_options(options))
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as host_nursery:
            await host_nursery.start(nursery._host)
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                nursery._cancel_now()
                raise
            await nursery.shutdown()
    except BaseExceptionGroup as group:
        # trio wraps an error of the block in a group; when it is the only error,
        # give the caller their own exception back.
        if body_error is not None and group.exceptions == (body_error,):
            raise body_error from None
        raise
    finally:
        if nursery._all_ended.is_set():
            nursery._finish()
