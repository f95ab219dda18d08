"""Tasks waiting out their backoff: an attempt failed or timed out with a retry left,
so the task waits, pending but holding no running slot, then is placed again."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from functools import partial

import trio

from .._engine.events import Outcome
from .._engine.tasks import Task
from .books import Books
from .onlookers import Onlookers

logger = logging.getLogger("trio_bg")


class Retries:
    """Waits out each retried task's backoff in a trio task of ``nursery``'s, then hands
    it to ``place(task, observed)``; cancelled while it waits, to ``cancelled(task)``."""

    __slots__ = ("_books", "_cancelled", "_onlookers", "_place")

    def __init__(
        self,
        books: Books,
        onlookers: Onlookers,
        place: Callable[[Task, bool], None],
        cancelled: Callable[[Task], None],
    ) -> None:
        self._books = books
        self._onlookers = onlookers
        self._place = place
        self._cancelled = cancelled

    def schedule(
        self,
        nursery: trio.Nursery,
        task: Task,
        outcome: Outcome,
        error: BaseException | None,
        observed: bool,
        duration: float | None,
    ) -> None:
        """``task``'s attempt failed (``error``) or timed out: log it, count it, and
        start its next attempt once its backoff delay has passed."""
        delay = task.backoff.delay(task.attempt, random.random())
        what = f"timed out after {task.timeout}s" if error is None else f"failed ({error!r})"
        logger.warning(
            "background task %s [%s]: attempt %d of %d %s; retrying in %.3gs",
            task.name,
            task.id,
            task.attempt,
            task.retries + 1,
            what,
            delay,
        )
        tracer = self._onlookers.tracer
        if error is not None and tracer is not None:
            tracer.record_failure(task, error)
        books = self._books
        books.pending += 1
        books.retrying += 1
        books.retried += 1
        if observed:
            self._onlookers.emit("retrying", task, outcome=outcome, duration=duration, delay=delay)
        task.attempt += 1
        task.state = "retrying"
        task.started_at = None
        task.thread_started = False
        # In the caller's context (a task with retries keeps it), not in this attempt's.
        assert task.context is not None
        wait = partial(self._wait, task, delay)
        task.context.run(nursery.start_soon, wait, name=f"{task.name} (backoff)")

    async def _wait(self, task: Task, delay: float) -> None:
        """Wait out ``task``'s backoff, then place it as a newly accepted task would
        be. Cancelled (the tasks are, at the end of the grace period), it ends
        cancelled without running again."""
        try:
            with trio.CancelScope() as task.scope:  # cancel_task's
                if task.cancel_requested:
                    task.scope.cancel()
                await trio.sleep(delay)
        except BaseException:
            self._waited(task)
            self._cancelled(task)
            raise
        self._waited(task)
        if task.cancel_requested:
            self._cancelled(task)
            return
        observed = self._onlookers.observed()
        if observed:
            task.accepted_at = trio.current_time()  # its next ``waited`` starts now
        self._place(task, observed)

    def _waited(self, task: Task) -> None:
        task.scope = None
        task.state = "pending"
        self._books.pending -= 1
        self._books.retrying -= 1
