"""The statuses a nursery keeps in memory: its live tasks by id, and its ended ones,
bounded by count and age (a keyed task's for its ``key_ttl`` at least); waiting for a
task's end; and deduplication by id."""

from __future__ import annotations

import heapq
import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

import trio

from .._engine.status import TaskState, TaskStatus, describe_error, utc
from .._engine.tasks import Task

DEFAULT_STATUSES_KEPT = 10_000
"""Ended tasks whose statuses a nursery keeps in memory, at most (the newest)."""

DEFAULT_STATUSES_KEPT_FOR = 600.0
"""Seconds a nursery keeps an ended task's status in memory, at most."""


_new_record = tuple.__new__


class Ended(NamedTuple):
    """What is kept of an ended task: its status, without its arguments. (A tuple of
    strings and numbers: small, quick to make, and never traversed by the cyclic GC.)"""

    id: str
    name: str
    state: TaskState
    attempt: int
    progress: float | None
    message: str | None
    result: str | None
    error: str | None
    created: float
    started: float | None
    ended: float
    key_until: float

    @classmethod
    def of(cls, task: Task, state: TaskState, error: str | None, ended: float) -> Ended:
        """The record of ``task``, which ended in ``state`` at ``ended``."""
        return _new_record(  # (tuple.__new__: the named tuple's own __new__ is slower)
            cls,
            (
                task.id,
                task.name,
                state,
                task.attempt,
                task.progress,
                task.message,
                task.result,
                error,
                task.created,
                task.started,
                ended,
                ended + task.key_ttl if task.key_ttl else 0.0,
            ),
        )

    def status(self) -> TaskStatus:
        """The `TaskStatus` this record keeps."""
        return status_of(self, self.state, self.result, self.error, self.ended)


def live_status(task: Task) -> TaskStatus:
    """The `TaskStatus` of a task that has not ended."""
    return status_of(task, task.state, None, None, None)


def status_of(
    source: Task | Ended,
    state: TaskState,
    result: str | None,
    error: str | None,
    ended: float | None,
) -> TaskStatus:
    """A `TaskStatus` of what a live task or an ended one's record says."""
    return TaskStatus(
        id=source.id,
        name=source.name,
        state=state,
        attempt=source.attempt,
        progress=source.progress,
        message=source.message,
        result=None if result is None else json.loads(result),
        error=error,
        created_at=utc(source.created),
        started_at=utc(source.started),
        ended_at=utc(ended),
    )


def checked_timeout(timeout: float | None) -> None:
    """`ValueError` for a ``timeout`` of `wait_task` that is not None nor seconds >= 0."""
    if timeout is not None and not (timeout >= 0 and not math.isnan(timeout)):
        raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")


class TaskStatuses:
    """A nursery's tasks by id: the live ones, and up to ``limit`` ended ones for up to
    ``max_age`` seconds (a keyed task with a ``key_ttl`` for that long at least).
    Written in trio's thread, except `claim`, called under the admission ``lock``
    (which `ended` takes too, so that a claim sees a task either live or ended)."""

    __slots__ = (
        "_ended",
        "_held",
        "_held_order",
        "_limit",
        "_lock",
        "_max_age",
        "_order",
        "_waiters",
        "live",
    )

    def __init__(self, limit: int, max_age: float, lock: threading.Lock) -> None:
        self._lock = lock
        self._limit = limit
        self._max_age = max_age
        self.live: dict[str, Task] = {}
        self._ended: dict[str, Ended] = {}
        self._order: deque[Ended] = deque()
        # Keyed tasks' records past the bounds above, kept until their key_until.
        self._held: dict[str, Ended] = {}
        self._held_order: list[tuple[float, str]] = []
        self._waiters: dict[str, _Waiter] = {}

    def claim(self, task: Task) -> Task | Ended | None:
        """The task (live, or ended with its key still held) that holds ``task``'s
        id, if one does; else None, and ``task`` is live from now on."""
        id = task.id
        holder: Task | Ended | None = self.live.get(id)
        if holder is None and task.keyed:
            holder = self._ended.get(id) or self._held.get(id)
            if holder is not None and holder.key_until <= time.time():
                holder = None
        if holder is None:
            self.live[id] = task
        return holder

    def release(self, task: Task) -> None:
        """``task`` was claimed but will not run here: never admitted (the nursery was
        full), or a duplicate of a task another process stored first. Whoever waits
        for it here is told it is not this nursery's (`wait` raises `LookupError`)."""
        if self.live.get(task.id) is task:
            del self.live[task.id]
        if self._waiters and (waiter := self._waiters.pop(task.id, None)) is not None:
            waiter.event.set()  # (with no record)

    def adopt(self, task: Task) -> None:
        """``task`` (taken from the journal) is live here, whatever this nursery kept
        of its id before (an ended record whose key it held: the row is the truth)."""
        self.live[task.id] = task

    def ended(self, task: Task, state: TaskState, error: BaseException | str | None) -> None:
        """``task`` ended in ``state``: keep its record, wake whoever waits for it."""
        if self.live.get(task.id) is not task:
            return  # (a task deduplicated away, or not claimed here)
        now = time.time()
        if isinstance(error, BaseException):
            error = describe_error(error)
        record = Ended.of(task, state, error, now)
        if task.keyed:  # (a claim of the same key sees it live or ended, never neither)
            with self._lock:
                del self.live[record.id]
                self._ended[record.id] = record
        else:
            del self.live[record.id]
            self._ended[record.id] = record
        self._order.append(record)
        self._sweep(now)
        if self._waiters and (waiter := self._waiters.pop(record.id, None)) is not None:
            waiter.record = record
            waiter.event.set()

    def _sweep(self, now: float) -> None:
        order = self._order
        oldest = now - self._max_age
        while order and (len(order) > self._limit or order[0].ended < oldest):
            record = order.popleft()
            if self._ended.get(record.id) is record:
                if record.key_until > now:  # (a claim sees it in one or the other)
                    with self._lock:
                        self._held[record.id] = record
                        del self._ended[record.id]
                    heapq.heappush(self._held_order, (record.key_until, record.id))
                else:
                    del self._ended[record.id]
        held = self._held_order
        while held and held[0][0] <= now:
            _, id = heapq.heappop(held)
            record_held = self._held.get(id)
            if record_held is not None and record_held.key_until <= now:
                del self._held[id]

    def find(self, id: str) -> Task | Ended | None:
        """The live task or the ended record with ``id``, if kept."""
        return self.live.get(id) or self._ended.get(id) or self._held.get(id)

    def status(self, id: str) -> TaskStatus | None:
        """``id``'s status, if this nursery knows it."""
        found = self.find(id)
        if found is None:
            return None
        return found.status() if isinstance(found, Ended) else live_status(found)

    async def wait(self, id: str, timeout: float | None) -> TaskStatus:
        """Return ``id``'s status once it has ended: `TimeoutError` after ``timeout``
        seconds, `LookupError` for an id this nursery does not know."""
        checked_timeout(timeout)
        found = self.find(id)
        if found is None:
            raise LookupError(f"no background task has the id {id!r}")
        if isinstance(found, Task):
            waiter = self._waiters.get(id) or self._waiters.setdefault(id, _Waiter())
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await waiter.event.wait()
            if waiter.record is not None:
                return waiter.record.status()
            if waiter.event.is_set():
                raise LookupError(
                    f"background task {id} is not this nursery's: another process added "
                    f"it first (ask task_status, which reads the journal and Redis)"
                )
            raise TimeoutError(f"background task {id} has not ended after {timeout}s")
        await trio.lowlevel.checkpoint()
        return found.status()

    def select(self, state: TaskState | None, name: str | None) -> Iterator[TaskStatus]:
        """The statuses kept, live ones first, in the order the tasks were added or
        ended, of those in ``state`` and named ``name`` (None: any)."""
        for task in list(self.live.values()):
            if (state is None or task.state == state) and (name is None or task.name == name):
                yield live_status(task)
        for record in list(self._ended.values()) + list(self._held.values()):
            if (state is None or record.state == state) and (name is None or record.name == name):
                yield record.status()

    def newest_ended(
        self, limit: int, state: TaskState | None, name: str | None
    ) -> list[TaskStatus]:
        """The statuses of the last ``limit`` tasks to end, newest first, of those in
        ``state`` and named ``name`` (None: any). Builds only the statuses it returns
        (the dashboard asks every second)."""
        found: list[TaskStatus] = []
        if limit <= 0:
            return found
        ended = self._ended
        for record in reversed(self._order):  # (in the order they ended, unlike _ended's)
            if ended.get(record.id) is not record:
                continue  # its id ran again since (a retried dead letter, a keyed task)
            if (state is None or record.state == state) and (name is None or record.name == name):
                found.append(record.status())
                if len(found) == limit:
                    break
        return found


class _Waiter:
    """Who waits for one task's end, and the record it ended with."""

    __slots__ = ("event", "record")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.record: Ended | None = None
