"""The machine inside a `BackgroundNursery`: admission, running slots, the queue,
retries, and the end of every task. It is also what the request side feeds
(`TaskSink`) and what the keepers of durable and remote tasks see (`NurseryPort`)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio

from .._engine.attempt import Attempt
from .._engine.events import Outcome
from .._engine.status import TaskHandle
from .._engine.tasks import Task, running_task, sent
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
from .books import Books
from .by_id import TasksById
from .discards import discard_unrun, drop_duplicate
from .onlookers import Onlookers, attempt_of
from .options import Settings
from .retries import Retries
from .statuses import TaskStatuses

if TYPE_CHECKING:
    from .._keeping.journal_keeper import JournalKeeper
    from .._keeping.remote_keeper import RemoteKeeper

logger = logging.getLogger("trio_bg")


class TaskRunner:
    """Admits tasks into ``max_running`` slots and a queue of ``max_pending``, runs
    them (``async def`` ones as trio tasks, plain ones in its worker threads), retries
    them, and ends each exactly once, in its `books`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # What keeps durable tasks (a journal) and remote ones (a streaq worker's queue
        # in Redis), set by open_nursery: collaborators told of each step of such a task.
        self.journal: JournalKeeper | None = None
        self.remote: RemoteKeeper | None = None
        self.nursery: trio.Nursery  # set by host; its cancel scope covers the tasks only
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._clock = trio.lowlevel.current_clock()  # readable from any thread
        self._capacity = settings.max_running + settings.max_pending
        self.admission_lock = threading.Lock()  # (the books' and statuses' too)
        self._queue: deque[Task] = deque()
        self.books = Books()
        self.closed = False
        self.all_ended = trio.Event()
        # Set when every task has ended, or a task or hook raised KeyboardInterrupt or
        # SystemExit (then onlookers.fatal holds it).
        self.stopping = trio.Event()
        self.unfinished: list[str] = []
        self.unfinished_ids: list[str] = []
        self.statuses = TaskStatuses(
            settings.statuses_kept, settings.statuses_kept_for, self.admission_lock
        )
        self.onlookers = Onlookers(settings, self._stop)
        self.by_id = TasksById(self)
        # Plain-function tasks: each attempt in a worker thread, no trio task waiting.
        self.threads = ThreadTasks(
            ThreadPool(settings.thread_limit, self._trio_token, self._clock),
            self._thread_started,
            self._thread_ended,
            self.onlookers.tracer,
        )
        self._retries = Retries(self.books, self.onlookers, self._place, self._cancel_retry)

    # -- taking work (TaskSink) ----------------------------------------------------

    def admit(self, task: Task) -> TaskHandle | None:
        """Reserve room for ``task`` or raise `Overloaded`; or, when a live task (or
        an ended one whose key is still held) has its id, return that one's handle and
        take nothing (``task`` is a duplicate)."""
        if task.durable and self.journal is None:
            raise needs_a_journal(task.name, "this background nursery has no journal")
        if task.remote is not None:
            if self.remote is None:
                raise needs_a_handoff(
                    task.name, "this background nursery hands off to no streaq worker"
                )
            self.remote.check(task, self.onlookers.tracer)
        with self.admission_lock:
            if self.closed:
                raise NurseryClosed(
                    f"the background nursery is shutting down and takes no new tasks "
                    f"(refused: {task.name})"
                )
            holder = self.statuses.claim(task)
            if holder is not None:
                self.books.deduplicated += 1
                return TaskHandle(holder.id, holder.name)
            if self.books.in_hand >= self._capacity:
                self.statuses.release(task)
                self.books.rejected += 1
                raise Overloaded(
                    f"the background nursery is full ({self.settings.max_running} running, "
                    f"{self.settings.max_pending} pending); refused: {task.name}"
                )
            self.books.admitted += 1
        return None

    def accept(self, tasks: Sequence[Task]) -> None:
        """Run or queue admitted ``tasks``.

        Admitted tasks are taken even while the shutdown drains; only once every
        task has ended does this raise `NurseryClosed`. From another thread (a thread
        task adding a follow-up task), the call is carried out in trio's thread.
        """
        if threading.get_ident() != self._trio_thread:
            trio.from_thread.run_sync(self.accept, tasks, trio_token=self._trio_token)
            return
        if self.all_ended.is_set():
            raise NurseryClosed("the background nursery has shut down")
        observed = self.onlookers.observed()
        for task in tasks:
            task.home = self.by_id
            if task.duplicate:
                drop_duplicate(self, task, pass_on=True)
                continue
            if (task.durable or task.remote is not None) and _not_kept(task):
                # Added outside a request, or after its response: kept first.
                self.books.keeping += 1
                self.nursery.start_soon(self._commit_then_accept, task, name=task.name)
                continue
            self.count_accepted(task, observed)
            if task.cancel_requested:
                self._end(task, "cancelled", observed)  # (by cancel_task, while collected)
            elif task.remote is None:
                self._place(task, observed)
            else:
                assert self.remote is not None  # (admit refuses them without one)
                self.remote.accept(task)

    def count_accepted(self, task: Task, observed: bool) -> None:
        if observed:  # before the counts change: a hook reading stats sees them balance
            task.accepted_at = trio.current_time()
            self.onlookers.emit("accepted", task)
        self.books.accepted += 1

    async def commit(self, tasks: Sequence[Task]) -> None:
        """Store the durable ones of ``tasks`` in the journal, and hand the remote ones
        to Redis, or, with a journal, store them in it too."""
        unkept = [task for task in tasks if _not_kept(task)]
        if not unkept:
            return
        if self.journal is not None:
            await self.journal.journal.append(unkept)
            return
        assert self.remote is not None  # (admit refuses them without one)
        await self.remote.handoff.send(unkept)  # (remote: admit refuses durable ones)
        for task in unkept:
            assert task.remote is not None
            task.remote.sent = True

    async def _commit_then_accept(self, task: Task) -> None:
        try:
            await self.commit((task,))
        except (JournalError, HandoffError) as error:
            self.books.keeping -= 1
            self.discard((task,), f"it could not be kept: {error}")
        else:
            self.books.keeping -= 1
            self.accept((task,))

    def _place(self, task: Task, observed: bool) -> None:
        """Run ``task`` now if a slot is free and none is queued, else queue it."""
        if self.nursery.cancel_scope.cancel_called:
            self._cancel_unstarted(task, observed)  # past the grace period: never runs
        elif self.journal is not None and task.journal_id is not None and self.journal.lost(task):
            self._end(task, "cancelled", observed)  # (a retry) its row is another's now
        elif not self._queue and self.books.running < self.settings.max_running:
            self.books.running += 1  # the slot is the task's from now on
            self._spawn(task)
        else:
            self.books.pending += 1
            task.accepted_at = trio.current_time()
            if task.context is None:
                task.context = contextvars.copy_context()
            self._queue.append(task)

    def _cancel_unstarted(self, task: Task, observed: bool) -> None:
        """``task``, and the tasks ordered after it, cancelled without running (in a
        loop: a chain can be long)."""
        while True:
            then, task.then = task.then, None
            self._end(task, "cancelled", observed)
            if then is None:
                return
            task = then
            self.count_accepted(task, observed)

    def discard(self, tasks: Sequence[Task], reason: str) -> None:
        """Release admitted tasks that will never run; count and log them. From another
        thread, the call is carried out in trio's thread."""
        if threading.get_ident() != self._trio_thread:
            trio.from_thread.run_sync(self.discard, tasks, reason, trio_token=self._trio_token)
            return
        discard_unrun(self, tasks, reason)

    # -- running -------------------------------------------------------------------

    def _spawn(self, task: Task) -> None:
        if task.journal_id is not None:  # durable: its start is recorded first
            assert self.journal is not None
            self.journal.start(task)
            return
        self.launch(task)

    def launch(self, task: Task) -> None:
        """Run ``task``, which holds a running slot, now (part of `NurseryPort`)."""
        if task.cancel_requested:  # (by cancel_task, while its start was recorded)
            self._attempt_over(task, "cancelled", self.onlookers.observed())
            return
        if not task.is_async:
            self.threads.submit(task)  # no trio task for it
            return
        # trio gives the new task a copy of the current context: the caller's, or
        # (run from inside it) the one the task was deferred with.
        if task.context is None:
            self._start_soon(task)
        else:
            task.context.run(self._start_soon, task)

    def _start_soon(self, task: Task) -> None:
        run: Callable[[Task], Awaitable[None]]
        run = self._run if self.onlookers.tracer is None else self._run_traced
        self.nursery.start_soon(run, task, name=task.name)

    async def _run(self, task: Task) -> None:
        """Run ``task`` (one attempt), then start the next pending task in its slot (in
        a trio task of its own, so that each task keeps its own context)."""
        # The clock is read only for those who look: it costs as much as a checkpoint.
        observed = self.onlookers.observed()
        attempt = Attempt()
        running_task.set(task)  # (in this trio task's own context: set_progress finds it)
        try:
            await attempt.run(task, partial(self._started, task, observed))
        finally:
            task.scope = None
            self._attempt_over(
                task, attempt.outcome, observed, attempt.error, retriable=not attempt.cancelled
            )

    async def _run_traced(self, task: Task) -> None:
        assert self.onlookers.tracer is not None
        with self.onlookers.tracer.span(task):
            await self._run(task)

    def _thread_started(self, task: Task, at: float) -> None:
        self._started(task, self.onlookers.observed(), at)

    def _thread_ended(self, task: Task, outcome: Outcome, error: BaseException | None) -> None:
        self._attempt_over(task, outcome, self.onlookers.observed(), error)

    def _started(self, task: Task, observed: bool, at: float | None = None) -> None:
        """The task's own run begins, now or ``at`` (a thread task: when its worker
        thread started it)."""
        task.state = "running"
        task.started = time.time()
        if observed:
            task.started_at = now = trio.current_time() if at is None else at
            waited = None if task.accepted_at is None else now - task.accepted_at
            self.onlookers.emit("started", task, waited=waited)

    def _attempt_over(
        self,
        task: Task,
        outcome: Outcome,
        observed: bool,
        error: BaseException | None = None,
        *,
        retriable: bool = True,
    ) -> None:
        """``task``'s attempt ended with ``outcome``: it ends, or waits for its retry;
        then the next pending task gets its running slot. A failure is retried only if
        it is an `Exception` raised while trio was not cancelling the task
        (``retriable``); any other `BaseException` is the task's failure for good."""
        retry = self._may_retry(task) and (
            outcome == "timed_out" or (retriable and isinstance(error, Exception))
        )
        if error is not None and not retry:
            self.onlookers.failed(task, error)
        self.books.running -= 1
        duration = (
            trio.current_time() - task.started_at
            if observed and task.started_at is not None
            else None
        )
        if retry:
            self._retries.schedule(self.nursery, task, outcome, error, observed, duration)
            if task.journal_id is not None:
                assert self.journal is not None
                self.journal.retrying(task)
        else:
            self._end(task, outcome, observed, duration, error)
        if self._queue and not self.nursery.cancel_scope.cancel_called:
            self.books.pending -= 1
            self.books.running += 1
            self._spawn(self._queue.popleft())

    def _may_retry(self, task: Task) -> bool:
        """Whether ``task``, its attempt failed or timed out, has a retry left and the
        shutdown has not cancelled the tasks yet."""
        return task.attempt <= task.retries and not self.nursery.cancel_scope.cancel_called

    # -- ending --------------------------------------------------------------------

    def _end(
        self,
        task: Task,
        outcome: Outcome,
        observed: bool,
        duration: float | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.books.ended(outcome)
        if outcome == "timed_out":
            logger.warning(
                "background task %s [%s] timed out after %ss%s",
                task.name,
                task.id,
                task.timeout,
                attempt_of(task),
            )
        elif outcome == "handed_off":
            assert self.remote is not None
            self.remote.handed_off(task)
        elif task.cancel_requested and outcome == "cancelled":
            self.books.cancelled_on_request += 1  # (not cut short: cancelled on purpose)
        elif outcome in ("cancelled", "abandoned"):
            self.unfinished.append(task.name)
            self.unfinished_ids.append(task.id)
        self.statuses.ended(task, outcome, error)
        if self.journal is not None:  # (room for one more from the journal, too)
            self.journal.ended(task, outcome, error)
        if observed:
            self.onlookers.emit("finished", task, outcome=outcome, duration=duration)
        elif (recorder := self.onlookers.recorder) is not None:
            recorder.finished(task.name, outcome, None)  # (added before it recorded: untimed)
        if task.then is not None:  # an ordered request's next task: its turn now
            if task.stops_chain and outcome in ("failed", "timed_out"):
                logger.warning(
                    "background task %s %s: skipping the tasks ordered after it",
                    task.name,
                    outcome.replace("_", " "),
                )
                then, task.then = task.then, None
                self.count_accepted(then, observed)
                self._cancel_unstarted(then, observed)
            else:
                self.accept((task.then,))
        if task.ends is not None:
            task.ends.ended()
        self.books.tell_idle()

    def _cancel_retry(self, task: Task) -> None:
        self._end(task, "cancelled", self.onlookers.observed())

    # -- looking on ----------------------------------------------------------------

    def oldest_pending_age(self) -> float:
        """How long the first queued task has waited for a running slot (0: none)."""
        if not self._queue:
            return 0.0
        return self._clock.current_time() - (self._queue[0].accepted_at or 0.0)

    # -- stopping ------------------------------------------------------------------

    def close(self) -> None:
        """Admit nothing more."""
        with self.admission_lock:
            self.closed = True

    def cancel_rest(self) -> None:
        """Cancel the running tasks, and the pending ones without running them."""
        self.close()
        observed = self.onlookers.observed()
        while self._queue:
            task = self._queue.popleft()
            self.books.pending -= 1
            self._end(task, "cancelled", observed)
        self.nursery.cancel_scope.cancel()  # (before the thread tasks: none is retried)
        self.threads.cancel_all()
        if self.remote is not None:
            self.remote.cancel()

    def _stop(self, again: bool) -> None:
        """A task or hook raised KeyboardInterrupt or SystemExit (see `Onlookers`):
        admit nothing more and have the nursery shut down; a second one cancels what
        is left at once."""
        if again:
            self.cancel_rest()
        else:
            self.close()
            self.stopping.set()

    async def host(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the tasks' nursery, so that its cancel scope covers the tasks only."""
        try:
            async with trio.open_nursery() as self.nursery:
                self.nursery.start_soon(self.threads.pool.deliver_news)
                self.nursery.start_soon(self.threads.keep_deadlines)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.threads.pool.close()  # (abandoned threads run on, unheard)
            self.all_ended.set()
            self.stopping.set()

    # -- for the keepers (through KeeperPort) and cancel_task -----------------------

    def take(self, task: Task) -> None:
        """Admit (room was counted by the feeder) and accept ``task``."""
        with self.admission_lock:
            self.books.admitted += 1
            self.statuses.adopt(task)
        self.accept((task,))

    def attempt_over(self, task: Task, outcome: Outcome) -> None:
        """``task`` holds a running slot but its attempt never started: it ends so."""
        self._attempt_over(task, outcome, self.onlookers.observed())

    def end(self, task: Task, outcome: Outcome) -> None:
        """An accepted task that holds nothing ends with ``outcome``."""
        self._end(task, outcome, self.onlookers.observed())

    def drop_queued(self, tasks: set[Task]) -> None:
        """Those of ``tasks`` that wait for a running slot end cancelled, unrun."""
        if tasks.isdisjoint(self._queue):
            return
        observed = self.onlookers.observed()
        queue, self._queue = self._queue, deque()
        for task in queue:
            if task in tasks:
                self.books.pending -= 1
                self._end(task, "cancelled", observed)
            else:
                self._queue.append(task)


def _not_kept(task: Task) -> bool:
    """Whether ``task`` must be stored in the journal (or handed to Redis) before it is
    accepted, and is not yet."""
    return (
        (task.durable or task.remote is not None)
        and task.journal_id is None
        and not task.duplicate
        and not task.cancel_requested  # (cancelled before it was kept: nothing to keep)
        and not sent(task)
    )
