"""Plain-function tasks: each attempt handed to the nursery's worker threads, with no
trio task waiting on it. Their starts and ends come back through the pool's callbacks,
one trio task keeps every timeout, and a shutdown takes back what no thread has
started and abandons what is running. Traced, an attempt's span is begun before it is
handed over (current in the context its thread runs it in) and ended with it."""

from __future__ import annotations

import contextvars
import heapq
import inspect
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, final

import outcome as outcomes
import trio
from outcome import Error, Value

from .events import Outcome
from .status import encode_result
from .tasks import running_task
from .thread_pool import Job, ThreadPool

if TYPE_CHECKING:
    from .tasks import Task
    from .tracing import TaskTracer


Started = Callable[["Task", float], object]
"""Told ``(task, at)``: a worker thread started ``task`` at ``at`` (on trio's clock)."""
Ended = Callable[["Task", Outcome, "BaseException | None"], object]
"""Told ``(task, outcome, error)``: the attempt ended (``"failed"``: with ``error``)."""


@final
class ThreadTasks:
    """The attempts of plain-function tasks in a `ThreadPool`, and their deadlines."""

    def __init__(
        self, pool: ThreadPool, started: Started, ended: Ended, tracer: TaskTracer | None
    ) -> None:
        self.pool = pool
        self._tell_started = started
        self._tell_ended = ended
        self._tracer = tracer
        self._jobs: dict[Task, Job] = {}
        self.awaiting = 0  # handed over, not started by a thread yet (shown as pending)
        self._deadlines: list[tuple[float, int, Task, Job]] = []
        self._deadline_order = itertools.count()  # (ties: never compare tasks)
        self._deadline_wake = trio.Event()
        # Bound once, not for each attempt: two objects less for the cyclic GC each.
        self._on_start: Callable[[Task, float], None] = self._started
        self._on_done: Callable[[Task, outcomes.Outcome[object]], None] = self._done

    def submit(self, task: Task) -> None:
        """Hand one attempt of ``task`` to the worker threads."""
        # Each attempt runs in a copy of the caller's context, as a trio task would: the
        # one the task was deferred with (a copy already, its own unless it may run
        # again), or, taken at once, the caller's own.
        context = task.context
        if context is None:
            context = contextvars.copy_context()
        elif task.retries:
            context = context.copy()
        context.run(running_task.set, task)  # (set_progress finds it there)
        if self._tracer is not None:
            self._tracer.begin(task, context)
        self.awaiting += 1
        job = Job(task.func, task.args, task.kwargs, context, task, self._on_start, self._on_done)
        self._jobs[task] = job
        self.pool.submit(job)

    def _started(self, task: Task, started_at: float) -> None:
        """A worker thread started ``task`` at ``started_at``: its timeout runs from then."""
        task.thread_started = True
        self.awaiting -= 1
        self._tell_started(task, started_at)
        if task.timeout is not None:
            job = self._jobs[task]
            deadline = started_at + task.timeout
            heapq.heappush(self._deadlines, (deadline, next(self._deadline_order), task, job))
            if self._deadlines[0][3] is job:  # the new first: the keeper sleeps too long
                self._deadline_wake.set()

    def _done(self, task: Task, result: outcomes.Outcome[object]) -> None:
        """``task``'s call returned (or raised) in its worker thread."""
        assert isinstance(result, Value | Error)
        del self._jobs[task]
        if len(self._deadlines) > 2 * len(self._jobs) + 64:
            self._forget_past_deadlines()
        error: BaseException | None = None
        if isinstance(result, Error):
            error = result.error
        elif inspect.isawaitable(value := result.value):
            if inspect.iscoroutine(value):
                value.close()
            error = TypeError(
                f"{task.name} returned an awaitable from a worker thread, so nothing awaited "
                f"it; define it with async def to run it as a trio task"
            )
        elif value is not None:
            task.result = encode_result(value)
        self._end(task, "completed" if error is None else "failed", error)

    def _end(self, task: Task, outcome: Outcome, error: BaseException | None = None) -> None:
        self._tell_ended(task, outcome, error)
        if self._tracer is not None:
            self._tracer.end(task)

    async def keep_deadlines(self) -> None:
        """One trio task for every thread task's timeout: it sleeps until the next."""
        while True:
            self._deadline_wake = trio.Event()
            if self._deadlines:
                with trio.move_on_at(self._deadlines[0][0]):
                    await self._deadline_wake.wait()  # (a task with an earlier deadline)
            else:
                await self._deadline_wake.wait()
            self._abandon_overdue()

    def _abandon_overdue(self) -> None:
        """Thread tasks past their timeout: their threads are abandoned (and replaced),
        the tasks timed out. (One that has just finished is heard as it finished.)"""
        now = trio.current_time()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, task, job = heapq.heappop(self._deadlines)
            if self._jobs.get(task) is job and self.pool.cancel(job) == "abandoned":
                del self._jobs[task]
                self._end(task, "timed_out")

    def _forget_past_deadlines(self) -> None:
        """Drop the deadlines of calls that have finished (they pile up otherwise)."""
        self._deadlines = [
            entry for entry in self._deadlines if self._jobs.get(entry[2]) is entry[3]
        ]
        heapq.heapify(self._deadlines)

    def __contains__(self, task: Task) -> bool:
        """Whether an attempt of ``task`` is in the threads' hands (started or not)."""
        return task in self._jobs

    def take_back(self, task: Task) -> bool:
        """Cancel ``task``'s attempt if no thread has started it: it ends cancelled."""
        job = self._jobs.get(task)
        if job is None or not self.pool.refuse(job):
            return False
        del self._jobs[task]
        self.awaiting -= 1
        self._end(task, "cancelled")
        return True

    def cancel_all(self) -> None:
        """The shutdown's end: what no thread has started never runs (cancelled); what
        runs is abandoned (its thread goes on, unheard). A call that has just finished
        is heard now, not after the report."""
        for task, job in list(self._jobs.items()):
            state: Literal["refused", "abandoned", "done"] = self.pool.cancel(job)
            if state == "done":
                self.pool.settle(job)
                continue
            del self._jobs[task]
            if state == "refused":
                self.awaiting -= 1
            self._end(task, "cancelled" if state == "refused" else "abandoned")
