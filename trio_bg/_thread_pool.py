"""The nursery's own worker threads for plain-function tasks.

``trio.to_thread.run_sync`` costs two wake-ups per call: a thread woken to run it, then
trio woken to hear back. Here a thread that finishes a task takes the next one itself,
and what the threads did (a task started, a task finished) goes back to trio in
batches: one ``run_sync_soon`` for everything that happened since trio last heard.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable
from typing import Literal, final

import outcome
import trio

try:  # private: what makes trio.from_thread work in a thread (see _work)
    from trio._threads import PARENT_TASK_DATA
except ImportError:  # pragma: no cover -- a trio that moved it: pass trio_token= then
    PARENT_TASK_DATA = None  # type: ignore[assignment]

IDLE_TIMEOUT = 10.0
"""Seconds an idle worker thread waits for work before it exits."""

_State = Literal["queued", "running", "refused", "abandoned", "done"]


@final
class _Job:
    """One call for a worker thread, and the trio task waiting for it."""

    __slots__ = (
        "call",
        "context",
        "on_start",
        "result",
        "start_told",
        "state",
        "waiter",
        "waiter_context",
    )

    def __init__(
        self, call: Callable[[], object], on_start: Callable[[], None], waiter: trio.lowlevel.Task
    ) -> None:
        self.call = call
        self.context = contextvars.copy_context()  # the waiting trio task's: the task's own
        self.on_start = on_start
        self.state: _State = "queued"
        self.start_told = False  # whether trio has heard that it started
        self.waiter: trio.lowlevel.Task | None = waiter
        self.waiter_context = waiter.context  # where on_start runs (not in use meanwhile)
        self.result: outcome.Outcome[object] | None = None


class ThreadPool:
    """At most ``limit`` worker threads (not counting abandoned ones), started as work
    comes and ending after `IDLE_TIMEOUT` idle seconds, or when the pool closes.

    `run` queues a call and waits for its result. Cancelled while the call is queued,
    the call never runs; cancelled while it runs, the thread is abandoned (it runs on,
    its result unheard) and replaced, so abandoned threads never starve the pool.
    """

    def __init__(self, limit: int, trio_token: trio.lowlevel.TrioToken) -> None:
        self._limit = limit
        self._token = trio_token
        self._lock = threading.Lock()
        self._work_came = threading.Condition(self._lock)
        self._jobs: deque[_Job] = deque()
        self._threads = 0  # running worker threads, abandoned ones not counted
        self._idle = 0  # of those, waiting for work
        self._closed = False
        self._news: list[tuple[_Job, bool]] = []  # (job, done): for trio, under _lock
        self.in_use = 0
        """Threads running a call, as trio knows it (abandoned ones until they end)."""

    async def run(self, call: Callable[[], object], on_start: Callable[[], None]) -> object:
        """Run ``call`` in a worker thread, in a copy of this task's context; return
        what it returned, or raise what it raised. ``on_start`` is called in trio's
        thread once trio knows a thread has started it (before the result, or the
        cancellation that abandons it)."""
        job = _Job(call, on_start, trio.lowlevel.current_task())
        with self._lock:
            self._jobs.append(job)
            if self._idle:
                self._work_came.notify()
            start = len(self._jobs) > self._idle and self._threads < self._limit
            if start:
                self._threads += 1
        if start:
            self._start_thread()

        def abort(_: object) -> trio.lowlevel.Abort:
            return self._abort(job)

        # Rescheduled with the call's outcome: its value comes back, or its error is raised.
        return await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        """No more work: idle threads end now, busy ones after their call."""
        with self._lock:
            self._closed = True
            self._work_came.notify_all()

    # -- in trio's thread -------------------------------------------------------------

    def _abort(self, job: _Job) -> trio.lowlevel.Abort:
        with self._lock:
            state = job.state
            if state == "queued":
                job.state = "refused"  # a thread that comes to it skips it: never runs
            elif state == "running":
                job.state = "abandoned"
                self._threads -= 1  # it no longer counts: a replacement may start
            else:  # done: its result is on its way to trio, which will hear it
                return trio.lowlevel.Abort.FAILED
        if state == "running":
            self._tell_start(job)
            # Once this round of cancellations is over: a shutdown cancels the queued
            # calls too, and a replacement must not start one of those meanwhile.
            self._token.run_sync_soon(self._replace_abandoned)
        job.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _replace_abandoned(self) -> None:
        with self._lock:
            waiting = sum(job.state == "queued" for job in self._jobs)
            start = waiting > self._idle and self._threads < self._limit
            if start:
                self._threads += 1
        if start:
            self._start_thread()

    def _tell_start(self, job: _Job) -> None:
        if not job.start_told:
            job.start_told = True
            self.in_use += 1
            job.waiter_context.run(job.on_start)

    def _deliver(self) -> None:
        """Hear everything the threads did since the last time."""
        with self._lock:
            news, self._news = self._news, []
        for job, done in news:
            self._tell_start(job)
            if done:
                self.in_use -= 1
                if job.waiter is not None:
                    assert job.result is not None
                    trio.lowlevel.reschedule(job.waiter, job.result)
                    job.waiter = None

    def _start_thread(self) -> None:
        threading.Thread(target=self._work, name="trio_bg worker", daemon=True).start()

    # -- in a worker thread -----------------------------------------------------------

    def _work(self) -> None:
        # So that trio.from_thread.run_sync (and run) work in a task without a token,
        # as in a thread of trio.to_thread.run_sync(..., abandon_on_cancel=True).
        if PARENT_TASK_DATA is not None:
            PARENT_TASK_DATA.token = self._token
            PARENT_TASK_DATA.abandon_on_cancel = True
            PARENT_TASK_DATA.cancel_register = [None]
            PARENT_TASK_DATA.task_register = [None]
        while (job := self._next_job()) is not None:
            self._tell(job, done=False)
            result = job.context.run(outcome.capture, job.call)
            with self._lock:
                abandoned = job.state == "abandoned"
                job.state = "done"
                job.result = result
            self._tell(job, done=True)
            if abandoned:
                return  # a replacement took this thread's place

    def _next_job(self) -> _Job | None:
        """The next queued job, now running; None when this thread should end."""
        with self._lock:
            while True:
                while self._jobs:
                    job = self._jobs.popleft()
                    if job.state == "queued":
                        job.state = "running"
                        return job
                if self._closed:
                    break
                self._idle += 1
                woken = self._work_came.wait(IDLE_TIMEOUT)
                self._idle -= 1
                if not woken and not self._jobs:
                    break
            self._threads -= 1
            return None

    def _tell(self, job: _Job, *, done: bool) -> None:
        with self._lock:
            first = not self._news
            self._news.append((job, done))
        if first:  # trio has not been woken for news yet: one wake-up for all of it
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._deliver)
