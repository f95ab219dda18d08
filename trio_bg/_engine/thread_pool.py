"""The nursery's own worker threads for plain-function tasks.

``trio.to_thread.run_sync`` costs two wake-ups per call: a thread woken to run it, then
trio woken to hear back. Here a thread that finishes a task takes the next one itself,
and what the threads did (a task started, a task finished) goes back to trio in
batches: one ``run_sync_soon`` for everything that happened since trio last heard, and
no trio task waits on a call (the nursery hears of it through callbacks).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, final

import outcome
import trio

try:  # private: what makes trio.from_thread work in a thread (see _work)
    from trio._threads import PARENT_TASK_DATA
except ImportError:  # pragma: no cover -- a trio that moved it: pass trio_token= then
    PARENT_TASK_DATA = None  # type: ignore[assignment]

IDLE_TIMEOUT = 10.0
"""Seconds an idle worker thread waits for work before it exits."""

_State = Literal["queued", "running", "refused", "abandoned", "done"]

OnStart = Callable[[Any, float], object]
"""Told ``(key, started_at)`` in trio's thread: a thread started the call then."""
OnDone = Callable[[Any, outcome.Outcome[object]], object]
"""Told ``(key, outcome)`` in trio's thread: the call returned or raised."""


@final
class Job:
    """One call for a worker thread, and whom to tell about it in trio's thread.

    The call's parts are kept as they are, and the callbacks are told a ``key``: no
    partials. A job lives until trio has heard of its call's end, and the fewer such
    objects, the less the cyclic GC walks meanwhile."""

    __slots__ = (
        "args",
        "context",
        "func",
        "key",
        "kwargs",
        "on_done",
        "on_start",
        "result",
        "start_told",
        "started_at",
        "state",
    )

    def __init__(
        self,
        func: Callable[..., object],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: contextvars.Context,
        key: object,
        on_start: OnStart,
        on_done: OnDone,
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.context = context  # what the call runs in (used by nobody else meanwhile)
        self.key = key
        self.on_start = on_start
        self.on_done: OnDone | None = on_done
        self.state: _State = "queued"
        self.start_told = False  # whether trio has heard that it started
        self.started_at = 0.0  # on trio's clock, read by its thread when it took the call
        self.result: outcome.Outcome[object] | None = None


class ThreadPool:
    """At most ``limit`` worker threads (not counting abandoned ones), started as work
    comes and ending after `IDLE_TIMEOUT` idle seconds, or when the pool closes.

    `submit` queues a call; what the threads do is heard in trio's thread, in batches,
    by `deliver_news` (a trio task): each call's ``on_start`` with the time its thread
    started it (trio's clock), then its ``on_done`` with its outcome (each with the
    call's key first). `cancel` takes a call back: queued, it never runs; running, its
    thread is abandoned (it runs on, its result unheard) and replaced, so abandoned
    threads never starve the pool. `run` is the same for one awaiting trio task.
    """

    def __init__(
        self, limit: int, trio_token: trio.lowlevel.TrioToken, clock: trio.abc.Clock
    ) -> None:
        self._limit = limit
        self._token = trio_token
        self._clock = clock  # (trio's clocks may be read from any thread)
        self._lock = threading.Lock()
        self._work_came = threading.Condition(self._lock)
        self._jobs: deque[Job] = deque()
        self._threads = 0  # running worker threads, abandoned ones not counted
        self._idle = 0  # of those, waiting for work
        self._closed = False
        self._news: list[tuple[Job, bool]] = []  # (job, done): for trio, under _lock
        self._news_came = trio.Event()
        self.in_use = 0
        """Threads running a call, as trio knows it (abandoned ones until they end)."""

    def submit(self, job: Job) -> None:
        """Queue a new ``job``: its call runs in its context in a worker thread, and its
        ``on_start`` and ``on_done`` will be told about it with its key."""
        with self._lock:
            self._jobs.append(job)
            if self._idle:
                self._work_came.notify()
            start = len(self._jobs) > self._idle and self._threads < self._limit
            if start:
                self._threads += 1
        if start:
            self._start_thread()

    def cancel(self, job: Job) -> Literal["refused", "abandoned", "done"]:
        """Take ``job`` back: ``"refused"`` if it had not started (it never will),
        ``"abandoned"`` if it had (its thread runs on, unheard); ``"done"`` if it had
        finished: its outcome is on its way to ``on_done`` (`settle` tells it now)."""
        with self._lock:
            state = job.state
            if state == "queued":
                job.state = "refused"  # a thread that comes to it skips it: never runs
            elif state == "running":
                job.state = "abandoned"
                self._threads -= 1  # it no longer counts: a replacement may start
        if state == "queued":
            job.on_done = None
            return "refused"
        if state == "running":
            job.on_done = None
            self._tell_start(job)
            # Once this round of cancellations is over: a shutdown cancels the queued
            # calls too, and a replacement must not start one of those meanwhile.
            self._token.run_sync_soon(self._replace_abandoned)
            return "abandoned"
        return "done"

    def refuse(self, job: Job) -> bool:
        """Take ``job`` back if no thread has started it (then it never runs)."""
        with self._lock:
            if job.state != "queued":
                return False
            job.state = "refused"
        job.on_done = None
        return True

    def settle(self, job: Job) -> None:
        """Call a done ``job``'s ``on_start`` and ``on_done`` now, not with the next news."""
        self._tell_start(job)
        self._tell_done(job)

    def close(self) -> None:
        """No more work: idle threads end now, busy ones after their call."""
        with self._lock:
            self._closed = True
            self._work_came.notify_all()

    async def deliver_news(self) -> None:
        """Tell trio, batch by batch, what the threads did: run until cancelled."""
        while True:
            await self._news_came.wait()
            self._news_came = trio.Event()
            with self._lock:
                news, self._news = self._news, []
            for job, done in news:
                self._tell_start(job)
                if done:
                    self.in_use -= 1
                    self._tell_done(job)

    # -- in trio's thread -------------------------------------------------------------

    def _replace_abandoned(self) -> None:
        with self._lock:
            waiting = sum(job.state == "queued" for job in self._jobs)
            start = waiting > self._idle and self._threads < self._limit
            if start:
                self._threads += 1
        if start:
            self._start_thread()

    def _tell_start(self, job: Job) -> None:
        if not job.start_told:
            job.start_told = True
            self.in_use += 1
            job.on_start(job.key, job.started_at)

    def _tell_done(self, job: Job) -> None:
        on_done, job.on_done = job.on_done, None
        if on_done is not None:
            assert job.result is not None
            on_done(job.key, job.result)

    def _news_arrived(self) -> None:
        self._news_came.set()

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
        job: Job | None
        while (job := self._next_job()) is not None:
            job.started_at = self._clock.current_time()
            self._tell(job, done=False)
            result = job.context.run(outcome.capture, job.func, *job.args, **job.kwargs)
            with self._lock:
                abandoned = job.state == "abandoned"
                job.state = "done"
                job.result = result
            self._tell(job, done=True)
            if abandoned:
                return  # a replacement took this thread's place

    def _next_job(self) -> Job | None:
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

    def _tell(self, job: Job, *, done: bool) -> None:
        with self._lock:
            first = not self._news
            self._news.append((job, done))
        if first:  # trio has not been woken for news yet: one wake-up for all of it
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._news_arrived)
