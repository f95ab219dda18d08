"""BackgroundNursery: admits, queues and runs tasks, counts their states, drains and cancels."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, Unpack

import trio

from .._engine.events import EventKind, Outcome, TaskEvent
from .._engine.report import ShutdownReport, TaskStats, names_with_counts
from .._engine.tasks import Task, sent
from .._engine.thread_pool import ThreadPool
from .._engine.thread_tasks import ThreadTasks
from .._errors import (
    HandoffError,
    JournalError,
    NurseryClosed,
    Overloaded,
    needs_a_handoff,
    needs_a_journal,
)
from .._keeping.handoff import Handoff
from .._keeping.journal import Journal
from .._keeping.journal_keeper import JournalKeeper
from .._keeping.remote_keeper import RemoteKeeper
from .options import NurseryOptions, Settings

if TYPE_CHECKING:
    from .._engine.tracing import TaskTracer

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

    def __init__(self, settings: Settings) -> None:
        """Private: use `open_background_nursery`."""
        self._settings = settings
        # What keeps durable tasks (a journal) and remote ones (a streaq worker's queue
        # in Redis), set by open_nursery: collaborators told of each step of such a task.
        self._journal: JournalKeeper | None = None
        self._remote: RemoteKeeper | None = None
        self._nursery: trio.Nursery  # set by _host; its cancel scope covers the tasks only
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._clock = trio.lowlevel.current_clock()  # readable from any thread
        self._capacity = settings.max_running + settings.max_pending
        # Tasks admitted and not yet ended or discarded: _admitted - _released.
        # Admission may happen in worker threads (sync handlers), so _admitted changes
        # under the lock; only trio's thread releases, so _released needs none (an
        # admission that reads it a moment early only errs on the safe side).
        self._admitted = self._released = 0
        self._admission_lock = threading.Lock()
        self._queue: deque[Task] = deque()
        self._closed = False
        self._all_ended = trio.Event()
        # Set when every task has ended, or a task or hook raised KeyboardInterrupt or
        # SystemExit (then _fatal holds it): see _shut_down_when_stopped.
        self._stopping = trio.Event()
        self._fatal: BaseException | None = None
        self._idle: trio.Event | None = None
        self._shutdown_started: float | None = None
        self._report: ShutdownReport | None = None
        self._unfinished: list[str] = []
        # Private: trio_bg.testing listens here to fail the test on a task's error.
        self._failure_watchers: list[Callable[[str, BaseException], object]] = []
        self._tracer: TaskTracer | None = None
        if settings.tracing:
            from .._engine.tracing import TaskTracer  # OpenTelemetry: only when asked for

            self._tracer = TaskTracer()
        # Plain-function tasks: each attempt in a worker thread, no trio task waiting.
        self._threads = ThreadTasks(
            ThreadPool(settings.thread_limit, self._trio_token, self._clock),
            self._thread_started,
            self._thread_ended,
            self._tracer,
        )
        # _pending counts the tasks queued or waiting for a retry (of those, _retrying
        # wait for a retry: they hold no running slot). _running counts the tasks
        # holding a running slot (of those, thread tasks no worker thread has started
        # yet are shown as pending).
        self._accepted = self._pending = self._running = 0
        # Tasks added outside a request that are being stored in the journal (or handed
        # to Redis) before they are accepted: shown as reserved, waited for when idle.
        self._keeping = 0
        self._completed = self._failed = self._timed_out = 0
        self._cancelled = self._abandoned = self._discarded = self._rejected = 0
        self._retrying = self._retried = 0
        # Remote tasks Redis acknowledged (the workers' now), and those whose hand-off
        # got no answer (Redis may have them: never counted discarded).
        self._handed_off = self._unconfirmed = 0

    # -- taking work ---------------------------------------------------------------

    def start_soon(self, func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``func(*args, **kwargs)`` in the background, now or once a slot frees.

        Checks the call like `BackgroundTasks.add_task` (`TypeError` for a call that
        could never run), and raises `Overloaded` when the nursery is full
        (`NurseryClosed` once shutdown has begun). The task runs in a copy of the
        caller's context. May be called from worker threads too.
        """
        task = Task(func, args, kwargs)
        self.admit(task)
        self.accept((task,))

    def admit(self, task: Task) -> None:
        """Reserve room for ``task`` or raise `Overloaded` (part of `TaskSink`)."""
        if task.durable and self._journal is None:
            raise needs_a_journal(task.name, "this background nursery has no journal")
        if task.remote is not None:
            if self._remote is None:
                raise needs_a_handoff(
                    task.name, "this background nursery hands off to no streaq worker"
                )
            self._remote.check(task, self._tracer)
        with self._admission_lock:
            if self._closed:
                raise NurseryClosed(
                    f"the background nursery is shutting down and takes no new tasks "
                    f"(refused: {task.name})"
                )
            if self._admitted - self._released >= self._capacity:
                self._rejected += 1
                raise Overloaded(
                    f"the background nursery is full ({self._settings.max_running} running, "
                    f"{self._settings.max_pending} pending); refused: {task.name}"
                )
            self._admitted += 1

    def accept(self, tasks: Sequence[Task]) -> None:
        """Run or queue admitted ``tasks`` (part of `TaskSink`).

        Admitted tasks are taken even while the shutdown drains; only once every
        task has ended does this raise `NurseryClosed`. From another thread (a thread
        task adding a follow-up task), the call is carried out in trio's thread.
        """
        if threading.get_ident() != self._trio_thread:
            trio.from_thread.run_sync(self.accept, tasks, trio_token=self._trio_token)
            return
        if self._all_ended.is_set():
            raise NurseryClosed("the background nursery has shut down")
        observed = self._observed()
        for task in tasks:
            if (task.durable or task.remote is not None) and _not_kept(task):
                # Added outside a request, or after its response: kept first.
                self._keeping += 1
                self._nursery.start_soon(self._commit_then_accept, task, name=task.name)
                continue
            if observed:  # before the counts change: a hook reading stats sees them balance
                task.accepted_at = trio.current_time()
                self._emit("accepted", task)
            self._accepted += 1
            if task.remote is None:
                self._place(task, observed)
            else:
                assert self._remote is not None  # (admit refuses them without one)
                self._remote.accept(task)

    async def commit(self, tasks: Sequence[Task]) -> None:
        """Store the durable ones of ``tasks`` in the journal, and hand the remote ones
        to Redis, or, with a journal, store them in it too (part of `TaskSink`)."""
        unkept = [task for task in tasks if _not_kept(task)]
        if self._journal is not None:
            if unkept:
                await self._journal.journal.append(unkept)
            return
        if unkept:
            assert self._remote is not None  # (admit refuses them without one)
            await self._remote.handoff.send(unkept)  # (remote: admit refuses durable ones)
            for task in unkept:
                assert task.remote is not None
                task.remote.sent = True

    async def _commit_then_accept(self, task: Task) -> None:
        try:
            await self.commit((task,))
        except (JournalError, HandoffError) as error:
            self._keeping -= 1
            self.discard((task,), f"it could not be kept: {error}")
        else:
            self._keeping -= 1
            self.accept((task,))

    def _place(self, task: Task, observed: bool) -> None:
        """Run ``task`` now if a slot is free and none is queued, else queue it."""
        if self._nursery.cancel_scope.cancel_called:
            self._cancel_unstarted(task, observed)  # past the grace period: never runs
        elif self._journal is not None and task.journal_id is not None and self._journal.lost(task):
            self._end(task, "cancelled", observed)  # (a retry) its row is another's now
        elif not self._queue and self._running < self._settings.max_running:
            self._running += 1  # the slot is the task's from now on
            self._spawn(task)
        else:
            self._pending += 1
            task.accepted_at = trio.current_time()
            if task.context is None:
                task.context = contextvars.copy_context()
            self._queue.append(task)

    def _cancel_unstarted(self, task: Task, observed: bool, *, accepting: bool = False) -> None:
        """``task``, accepted past the grace period (or skipped: ``accepting`` it
        here), and the tasks ordered after it: cancelled without running (in a loop:
        a chain can be long)."""
        if accepting:
            if observed:
                task.accepted_at = trio.current_time()
                self._emit("accepted", task)
            self._accepted += 1
        while True:
            then, task.then = task.then, None
            self._end(task, "cancelled", observed)
            if then is None:
                return
            task = then
            if observed:
                task.accepted_at = trio.current_time()
                self._emit("accepted", task)
            self._accepted += 1

    def discard(self, tasks: Sequence[Task], reason: str) -> None:
        """Release admitted tasks that will never run; count and log them (part of
        `TaskSink`). From another thread, the call is carried out in trio's thread."""
        if threading.get_ident() != self._trio_thread:
            trio.from_thread.run_sync(self.discard, tasks, reason, trio_token=self._trio_token)
            return
        handed = [task for task in tasks if sent(task)]
        if handed:
            # Redis had them before the response failed: they are the workers' now.
            logger.warning(
                "%d remote task(s) had been handed off already (%s): %s",
                len(handed),
                reason,
                ", ".join(task.name for task in handed),
            )
            observed = self._observed()
            for task in handed:
                self._accepted += 1
                if observed:
                    self._emit("accepted", task)
                self._end(task, "handed_off", observed)
            tasks = [task for task in tasks if not sent(task)]
            if not tasks:
                return
        in_doubt = [task for task in tasks if task.remote is not None and task.remote.in_doubt]
        if in_doubt:
            logger.warning(
                "%d remote task(s) got no answer from Redis (%s); Redis may have them and "
                "a worker may run them, so they count as unconfirmed: %s",
                len(in_doubt),
                reason,
                names_with_counts(task.name for task in in_doubt),
            )
            self._released += len(in_doubt)
            self._unconfirmed += len(in_doubt)
            _tell_ended(in_doubt)
            tasks = [task for task in tasks if task.remote is None or not task.remote.in_doubt]
            if not tasks:
                self._set_idle_if_idle()
                return
        self._released += len(tasks)
        self._discarded += len(tasks)
        _tell_ended(tasks)
        if self._journal is not None:
            self._journal.discarded(tasks)
        self._set_idle_if_idle()
        logger.warning(
            "discarded %d background task(s) (%s): %s",
            len(tasks),
            reason,
            ", ".join(task.name for task in tasks),
        )

    def _spawn(self, task: Task) -> None:
        if task.journal_id is not None:  # durable: its start is recorded first
            assert self._journal is not None
            self._journal.start(task)
            return
        self._launch(task)

    def _launch(self, task: Task) -> None:
        if not task.is_async:
            self._threads.submit(task)  # no trio task for it
            return
        # trio gives the new task a copy of the current context: the caller's, or
        # (run from inside it) the one the task was deferred with.
        if task.context is None:
            self._start_soon(task)
        else:
            task.context.run(self._start_soon, task)

    def _start_soon(self, task: Task) -> None:
        run: Callable[[Task], Awaitable[None]]
        run = self._run if self._tracer is None else self._run_traced
        if task.journal_id is not None and self._journal is not None:
            run = self._journal.claimed(task, run)
        self._nursery.start_soon(run, task, name=task.name)

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
        return TaskStats(
            pending=self._pending + self._threads.awaiting,
            running=self._running - self._threads.awaiting,
            reserved=self._admitted - self._released - self._pending - self._running,
            rejected=self._rejected,
            oldest_pending_age=(
                self._clock.current_time() - (self._queue[0].accepted_at or 0.0)
                if self._queue
                else 0.0
            ),
            threads_in_use=self._threads.pool.in_use,
            retrying=self._retrying,
            retried=self._retried,
            **self._counts("recovered", "deferred", "unknown", "resent", "maybe_lost"),
        )

    def _counts(self, *kept: str) -> dict[str, int]:
        """The totals `stats` and the report share, and those of ``kept`` that the
        keepers (the journal's, Redis's) count."""
        keepers: dict[str, int] = {}
        if (journal := self._journal) is not None:
            keepers.update(
                recovered=journal.recovered,
                deferred=journal.deferred,
                unknown=journal.unknown,
                lease_lost=journal.lease_lost,
            )
        if (remote := self._remote) is not None:
            keepers.update(
                outbox=remote.left_in_outbox, resent=remote.resent, maybe_lost=remote.maybe_lost
            )
        return {
            "accepted": self._accepted,
            "completed": self._completed,
            "failed": self._failed,
            "timed_out": self._timed_out,
            "cancelled": self._cancelled,
            "abandoned": self._abandoned,
            "discarded": self._discarded,
            "handed_off": self._handed_off,
            "unconfirmed": self._unconfirmed,
        } | {name: keepers[name] for name in kept if name in keepers}

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
        """Return once no task is pending or running, nor being stored in the journal
        (or handed to Redis) to be accepted."""
        while self._pending or self._running or self._keeping:
            await self._next_idle()
        await trio.lowlevel.checkpoint()

    async def _wait_drained(self) -> None:
        """Return once no task is pending or running, nor admitted by a request still
        in flight (whose tasks are not handed off yet)."""
        while self._admitted - self._released:
            await self._next_idle()
        await trio.lowlevel.checkpoint()

    async def _next_idle(self) -> None:
        if self._idle is None or self._idle.is_set():
            self._idle = trio.Event()
        await self._idle.wait()

    # -- shutting down -------------------------------------------------------------

    async def shutdown(self) -> ShutdownReport:
        """Stop admitting, wait up to ``grace_period`` for pending and running tasks,
        cancel the rest, and return the `ShutdownReport`. Calling it again (or
        concurrently) returns the same report."""
        if self._shutdown_started is None:
            self._close()
            logger.info(
                "draining background tasks for up to %ss: %d running, %d pending",
                self._settings.grace_period,
                self._running,
                self._pending,
            )
            try:
                with trio.move_on_after(self._settings.grace_period):
                    await self.wait_idle()
            finally:
                self._cancel_rest()
        await self._all_ended.wait()
        return self._finish()

    def cancel(self) -> None:
        """Stop admitting and cancel every task now, without (or ending) the grace
        period. A `shutdown` under way then returns as soon as the tasks have ended.
        """
        self._cancel_rest()

    def _close(self) -> None:
        with self._admission_lock:
            self._closed = True
        if self._shutdown_started is None:
            self._shutdown_started = trio.current_time()

    def _cancel_rest(self) -> None:
        """Cancel the running tasks, and the pending ones without running them."""
        self._close()
        observed = self._observed()
        while self._queue:
            task = self._queue.popleft()
            self._pending -= 1
            self._end(task, "cancelled", observed)
        self._nursery.cancel_scope.cancel()  # (before the thread tasks: none is retried)
        self._threads.cancel_all()
        if self._remote is not None:
            self._remote.cancel()

    def _finish(self) -> ShutdownReport:
        """Build (once) and log the report; every task has ended."""
        if self._report is None:
            started = self._shutdown_started
            self._report = ShutdownReport(
                unfinished=tuple(self._unfinished),
                duration=0.0 if started is None else trio.current_time() - started,
                **self._counts(
                    "deferred", "recovered", "outbox", "resent", "maybe_lost", "lease_lost"
                ),
            )
            log = logger.info if self._report.all_completed else logger.warning
            log("background tasks shut down: %s", self._report)
            if self._unfinished:
                log("unfinished background tasks: %s", names_with_counts(self._unfinished))
        return self._report

    # -- running one task ----------------------------------------------------------

    async def _run(self, task: Task) -> None:
        """Run ``task`` (one attempt), then start the next pending task in its slot (in
        a trio task of its own, so that each task keeps its own context)."""
        # The clock is read only for those who look: it costs as much as a checkpoint.
        observed = self._observed()
        outcome: Outcome = "cancelled"
        error: BaseException | None = None
        retry = False
        try:
            # A task the shutdown cancelled before it was scheduled never starts.
            await trio.lowlevel.checkpoint_if_cancelled()
            if task.timeout is None:
                self._started(task, observed)
                await task.func(*task.args, **task.kwargs)
                outcome = "completed"
            else:
                self._started(task, observed)
                with trio.move_on_after(task.timeout) as timeout_scope:
                    await task.func(*task.args, **task.kwargs)
                outcome = "timed_out" if timeout_scope.cancelled_caught else "completed"
        except BaseException as exc:
            cancellation, error = _split_cancellation(exc)
            if error is None:
                raise  # trio's cancellation is never swallowed
            # It failed, perhaps while being cancelled (cleanup code that raised). Any
            # BaseException is the task's failure; KeyboardInterrupt and SystemExit
            # also stop the nursery (see _stop_for), never just this one task's trio task.
            # Only an Exception, not while cancelled, may be retried.
            outcome = "failed"
            retry = cancellation is None and isinstance(error, Exception) and self._may_retry(task)
            if not retry:
                self._report_failure(task, error)
            if cancellation is not None:
                raise cancellation from None  # the cancellation goes on; the error stays here
        finally:
            self._attempt_over(task, outcome, observed, error, retry)

    def _attempt_over(
        self,
        task: Task,
        outcome: Outcome,
        observed: bool,
        error: BaseException | None = None,
        retry: bool = False,
    ) -> None:
        """``task``'s attempt ended with ``outcome``: it ends, or waits for its retry;
        then the next pending task gets its running slot."""
        self._running -= 1
        duration = (
            trio.current_time() - task.started_at
            if observed and task.started_at is not None
            else None
        )
        if retry or (outcome == "timed_out" and self._may_retry(task)):
            self._retry_later(task, outcome, error, observed, duration)
        else:
            self._end(task, outcome, observed, duration, error)
        if self._queue and not self._nursery.cancel_scope.cancel_called:
            self._pending -= 1
            self._running += 1
            self._spawn(self._queue.popleft())

    # -- running a plain-function task ---------------------------------------------

    def _thread_started(self, task: Task, at: float) -> None:
        self._started(task, self._observed(), at)

    def _thread_ended(self, task: Task, outcome: Outcome, error: BaseException | None) -> None:
        retry = isinstance(error, Exception) and self._may_retry(task)
        if error is not None and not retry:
            self._report_failure(task, error)
        self._attempt_over(task, outcome, self._observed(), error, retry)

    async def _run_traced(self, task: Task) -> None:
        assert self._tracer is not None
        with self._tracer.span(task):
            await self._run(task)

    def _started(self, task: Task, observed: bool, at: float | None = None) -> None:
        """The task's own run begins, now or ``at`` (a thread task: when its worker
        thread started it)."""
        if observed:
            task.started_at = now = trio.current_time() if at is None else at
            waited = None if task.accepted_at is None else now - task.accepted_at
            self._emit("started", task, waited=waited)

    def _may_retry(self, task: Task) -> bool:
        """Whether ``task``, its attempt failed or timed out, has a retry left and the
        shutdown has not cancelled the tasks yet."""
        return task.attempt <= task.retries and not self._nursery.cancel_scope.cancel_called

    def _retry_later(
        self,
        task: Task,
        outcome: Outcome,
        error: BaseException | None,
        observed: bool,
        duration: float | None,
    ) -> None:
        """``task``'s attempt failed or timed out and it has a retry left: it waits for
        its backoff delay, pending, holding no running slot."""
        delay = task.backoff.delay(task.attempt, random.random())
        what = f"timed out after {task.timeout}s" if error is None else f"failed ({error!r})"
        logger.warning(
            "background task %s: attempt %d of %d %s; retrying in %.3gs",
            task.name,
            task.attempt,
            task.retries + 1,
            what,
            delay,
        )
        if error is not None and self._tracer is not None:
            self._tracer.record_failure(task, error)
        self._pending += 1
        self._retrying += 1
        self._retried += 1
        if observed:
            self._emit("retrying", task, outcome=outcome, duration=duration, delay=delay)
        task.attempt += 1
        if task.journal_id is not None:
            assert self._journal is not None
            self._journal.retrying(task)
        task.started_at = None
        task.thread_started = False
        # In the caller's context (a task with retries keeps it), not in this attempt's.
        assert task.context is not None
        wait = partial(self._wait_for_retry, task, delay)
        task.context.run(self._nursery.start_soon, wait, name=f"{task.name} (backoff)")

    async def _wait_for_retry(self, task: Task, delay: float) -> None:
        """Wait out ``task``'s backoff, then run or queue it as a newly accepted task
        would be. Cancelled (the tasks are, at the end of the grace period), it ends
        cancelled without running again."""
        try:
            await trio.sleep(delay)
        except BaseException:
            self._pending -= 1
            self._retrying -= 1
            self._end(task, "cancelled", self._observed())
            raise
        self._pending -= 1
        self._retrying -= 1
        observed = self._observed()
        if observed:
            task.accepted_at = trio.current_time()  # its next ``waited`` starts now
        self._place(task, observed)

    def _end(
        self,
        task: Task,
        outcome: Outcome,
        observed: bool,
        duration: float | None = None,
        error: BaseException | None = None,
    ) -> None:
        if outcome == "completed":
            self._completed += 1
        elif outcome == "failed":
            self._failed += 1
        elif outcome == "timed_out":
            self._timed_out += 1
            logger.warning(
                "background task %s timed out after %ss%s", task.name, task.timeout, _of(task)
            )
        elif outcome == "handed_off":
            self._handed_off += 1
            assert self._remote is not None
            self._remote.handed_off(task)
        else:
            self._unfinished.append(task.name)
            if outcome == "cancelled":
                self._cancelled += 1
            else:
                self._abandoned += 1
        self._released += 1
        if self._journal is not None:  # (room for one more from the journal, too)
            self._journal.ended(task, outcome, error)
        if observed:
            self._emit("finished", task, outcome=outcome, duration=duration)
        if task.then is not None:  # an ordered request's next task: its turn now
            if task.stops_chain and outcome in ("failed", "timed_out"):
                logger.warning(
                    "background task %s %s: skipping the tasks ordered after it",
                    task.name,
                    outcome.replace("_", " "),
                )
                then, task.then = task.then, None
                self._cancel_unstarted(then, observed, accepting=True)
            else:
                self.accept((task.then,))
        if task.ends is not None:
            task.ends.ended()
        self._set_idle_if_idle()

    def _set_idle_if_idle(self) -> None:
        if self._idle is not None and not (self._pending or self._running or self._keeping):
            self._idle.set()

    def _report_failure(self, task: Task, exc: BaseException) -> None:
        logger.error("background task %s failed%s", task.name, _of(task), exc_info=exc)
        if self._tracer is not None:
            self._tracer.record_failure(task, exc)
        for watcher in self._failure_watchers:
            watcher(task.name, exc)
        if _stops_the_process(exc):
            self._stop_for(exc, f"background task {task.name}")
        hook = self._settings.on_error
        if hook is None:
            return
        try:
            hook(task.name, exc)
        except BaseException as error:  # a hook never breaks the nursery
            self._hook_failed("on_error", task, error)

    def _hook_failed(self, hook: str, task: Task, error: BaseException) -> None:
        logger.error("the %s hook failed for background task %s", hook, task.name, exc_info=error)
        if _stops_the_process(error):
            self._stop_for(error, f"the {hook} hook")

    def _stop_for(self, exc: BaseException, culprit: str) -> None:
        """A task or hook raised KeyboardInterrupt or SystemExit: shut the nursery down
        (stop admitting, drain, cancel, report), then let it go on up (see
        _shut_down_when_stopped). A second one cancels what is left at once."""
        if self._fatal is not None:
            logger.critical("%s raised %s as well: cancelling the rest now", culprit, _kind(exc))
            self._cancel_rest()
            return
        self._fatal = exc
        logger.critical(
            "%s raised %s: shutting the background tasks down (drain for up to %ss, cancel, "
            "report); it is raised again after that",
            culprit,
            _kind(exc),
            self._settings.grace_period,
        )
        with self._admission_lock:  # at once; the shutdown itself starts in a moment
            self._closed = True
        self._stopping.set()

    def _observed(self) -> bool:
        """Whether anyone looks at task events (a hook, tracing, or the debug log)."""
        settings = self._settings
        return (
            settings.on_event is not None or settings.tracing or logger.isEnabledFor(logging.DEBUG)
        )

    def _emit(
        self,
        kind: EventKind,
        task: Task,
        *,
        waited: float | None = None,
        outcome: Outcome | None = None,
        duration: float | None = None,
        delay: float | None = None,
    ) -> None:
        hook = self._settings.on_event
        event = TaskEvent(
            kind,
            task.name,
            waited=waited,
            outcome=outcome,
            duration=duration,
            attempt=task.attempt,
            delay=delay,
        )
        logger.debug("background task %s", event)
        if self._tracer is not None:
            self._tracer.record(task, event)
        if hook is None:
            return
        try:
            hook(event)
        except BaseException as error:  # a hook never breaks the nursery
            self._hook_failed("on_event", task, error)

    async def _host(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the tasks' nursery, so that its cancel scope covers the tasks only."""
        try:
            async with trio.open_nursery() as self._nursery:
                self._nursery.start_soon(self._threads.pool.deliver_news)
                self._nursery.start_soon(self._threads.keep_deadlines)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._threads.pool.close()  # (abandoned threads run on, unheard)
            self._all_ended.set()
            self._stopping.set()

    async def _shut_down_when_stopped(self, *, raise_fatal: bool) -> None:
        """Once a task raised KeyboardInterrupt or SystemExit, shut down; then raise it
        if asked (it cancels the code around the nursery, as trio would)."""
        await self._stopping.wait()
        if self._fatal is None:
            return  # every task ended: the nursery is closing the ordinary way
        await self.shutdown()
        if raise_fatal:
            raise self._fatal


def _not_kept(task: Task) -> bool:
    """Whether ``task`` must be stored in the journal (or handed to Redis) before it is
    accepted, and is not yet."""
    return (task.durable or task.remote is not None) and task.journal_id is None and not sent(task)


def _split_cancellation(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``exc`` as (trio's cancellation in it, everything else), either part None."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    if isinstance(exc, trio.Cancelled):
        return exc, None
    return None, exc


_PROCESS_STOPPERS = (KeyboardInterrupt, SystemExit)


def _stops_the_process(exc: BaseException) -> bool:
    """Whether ``exc`` is (or holds) a KeyboardInterrupt or SystemExit."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(_PROCESS_STOPPERS) is not None
    return isinstance(exc, _PROCESS_STOPPERS)


def _kind(exc: BaseException) -> str:
    return repr(exc) if isinstance(exc, SystemExit) else type(exc).__name__


def _tell_ended(tasks: Iterable[Task]) -> None:
    """Tell whoever waits for ``tasks`` to end (see `TaskEnds`) that they did."""
    for task in tasks:
        if task.ends is not None:
            task.ends.ended()


def _of(task: Task) -> str:
    """Which attempt ended a task that has retries, for its log line."""
    return f" (attempt {task.attempt} of {task.retries + 1})" if task.retries else ""


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
    ``nursery._fatal`` for the owner (the middleware) to raise when it sees fit."""
    nursery = BackgroundNursery(settings)
    port = _Port(nursery)
    journal = None
    if settings.journal is not None:
        journal = JournalKeeper(
            await Journal.open(
                os.fspath(settings.journal),
                lease=settings.journal_lease,
                synchronous=settings.journal_synchronous,
            ),
            port,
            max_running=settings.max_running,
            max_pending=settings.max_pending,
        )
        nursery._journal = journal
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as host_nursery:
            remote = None
            if settings.streaq is not None:
                run = partial(Handoff(settings.streaq).run, patient=journal is not None)
                remote = nursery._remote = RemoteKeeper(await host_nursery.start(run), port)
            await host_nursery.start(nursery._host)
            if remote is not None:
                nursery._nursery.start_soon(remote.watch)
                if journal is not None:
                    journal.keep_remote(remote)
                    nursery._nursery.start_soon(remote.forward)
            if journal is not None:
                nursery._nursery.start_soon(journal.record_starts)
                await nursery._nursery.start(journal.feed)
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
        for own in (body_error, nursery._fatal):
            if own is not None and group.exceptions == (own,):
                raise own from own.__cause__  # (keeps the original cause)
        if len(group.exceptions) == 1 and isinstance(
            group.exceptions[0], JournalError | HandoffError
        ):
            raise group.exceptions[0] from None  # the journal or Redis failed at startup
        raise
    finally:
        if nursery._all_ended.is_set():
            nursery._finish()
        if journal is not None:
            try:
                await journal.journal.close(keep=journal.kept)
            except JournalError as error:  # its rows wait for the lease to expire
                logger.error("%s", error)


class _Port:
    """The nursery as its keepers see it (`trio_bg._keeping.port.NurseryPort`)."""

    __slots__ = ("_nursery",)

    def __init__(self, nursery: BackgroundNursery) -> None:
        self._nursery = nursery

    @property
    def closed(self) -> bool:
        return self._nursery._closed

    @property
    def cancelled(self) -> bool:
        return self._nursery._nursery.cancel_scope.cancel_called

    def room(self, limit: int) -> int:
        nursery = self._nursery
        return limit - (nursery._admitted - nursery._released)

    def take(self, task: Task) -> None:
        nursery = self._nursery
        with nursery._admission_lock:  # (room was counted by the feeder)
            nursery._admitted += 1
        nursery.accept((task,))

    def launch(self, task: Task) -> None:
        self._nursery._launch(task)

    def attempt_over(self, task: Task, outcome: Outcome) -> None:
        self._nursery._attempt_over(task, outcome, self._nursery._observed())

    def hold(self, task: Task) -> None:
        self._nursery._pending += 1

    def release(self, task: Task, outcome: Outcome) -> None:
        self._nursery._pending -= 1
        self.end(task, outcome)

    def end(self, task: Task, outcome: Outcome) -> None:
        self._nursery._end(task, outcome, self._nursery._observed())

    def drop_queued(self, tasks: set[Task]) -> None:
        nursery = self._nursery
        if tasks.isdisjoint(nursery._queue):
            return
        observed = nursery._observed()
        queue, nursery._queue = nursery._queue, deque()
        for task in queue:
            if task in tasks:
                nursery._pending -= 1
                nursery._end(task, "cancelled", observed)
            else:
                nursery._queue.append(task)


# What the package asks of a nursery beyond its public face (its owner: the
# middleware, trio_bg.serve, the test kit), read here, where those attributes live.


def fatal(nursery: BackgroundNursery) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit a task raised (the nursery then shut itself
    down), for its owner to raise when it sees fit; None if none did."""
    return nursery._fatal


async def stopping(nursery: BackgroundNursery) -> None:
    """Return once every task has ended, or a task raised KeyboardInterrupt or
    SystemExit (see `fatal`)."""
    await nursery._stopping.wait()


async def wait_drained(nursery: BackgroundNursery) -> None:
    """Return once no task is pending or running, nor admitted by a request still in
    flight (whose tasks are not handed off yet)."""
    await nursery._wait_drained()


def watch_failures(
    nursery: BackgroundNursery, watchers: Iterable[Callable[[str, BaseException], object]]
) -> None:
    """Have ``watchers`` told ``(name, error)`` of every task that fails (the test kit
    fails the test)."""
    nursery._failure_watchers.extend(watchers)
