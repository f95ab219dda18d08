"""What a task's id answers: its status, its end, its cancellation, and the statuses
by state and name."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .._engine.status import STATES, TaskState, TaskStatus, looks_like_id, utc
from .._engine.tasks import Task, sent
from .._keeping.journal_file import REMOTE_PREFIX, EndedRow, Row
from .._keeping.remote_status import abort_remote, remote_status, wait_remote
from .statuses import checked_timeout

if TYPE_CHECKING:
    from .runner import TaskRunner

T = TypeVar("T")

logger = logging.getLogger("trio_bg")

JOURNAL_POLL = 1.0
"""Seconds between reads of a durable task's row, at most, while another process's
task is waited for."""


class TasksById:
    """A nursery's tasks, looked up by id (its `BackgroundNursery` methods of the
    same names, and the module functions, ask here)."""

    __slots__ = ("_runner",)

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    def progressed(self, task: Task) -> None:
        """``task`` said how far it got: a durable one's row keeps it too, for every
        process that shares the journal. From any thread."""
        keeper = self._runner.journal
        if task.journal_id is not None and keeper is not None:
            keeper.journal.set_progress(task.journal_id, task.progress, task.message)

    async def task_status(self, id: str) -> TaskStatus | None:
        """See `BackgroundNursery.task_status`: this process's statuses first, then
        Redis's (a remote task) and the journal's rows (the durable tasks of every
        process that shares it)."""
        runner = self._runner
        status = runner.statuses.status(_checked(id))
        if _elsewhere(id, status):
            if runner.remote is not None:  # handed off (here or by another web process)
                told = await _asked_redis(remote_status(runner.remote.handoff.worker, id))
                if told is not None:
                    return told
            if status is None and runner.journal is not None:
                row = await runner.journal.journal.find(id)
                return None if row is None else row_status(row)
        await trio.lowlevel.checkpoint()
        return status

    async def wait_task(self, id: str, timeout: float | None = None) -> TaskStatus:
        """See `BackgroundNursery.wait_task` (a remote task: until its worker stored
        its result)."""
        runner = self._runner
        status = runner.statuses.status(_checked(id))
        if _elsewhere(id, status):
            if (remote := runner.remote) is not None:
                told = await _asked_redis(remote_status(remote.handoff.worker, id))
                if told is not None:
                    if told.ended:
                        return told
                    return await wait_remote(remote.handoff.worker, id, timeout)
                if status is not None:
                    return status  # handed off, and Redis cannot say more now
            if runner.journal is not None:
                checked_timeout(timeout)
                row = await runner.journal.journal.find(id)
                if row is not None:  # another process's durable task
                    return await self._wait_in_journal(id, row, timeout)
        return await runner.statuses.wait(id, timeout)

    async def _wait_in_journal(
        self, id: str, row: Row | EndedRow | None, timeout: float | None
    ) -> TaskStatus:
        """Wait for another process's durable task to end, reading its row every so
        often (from 50 ms apart to `JOURNAL_POLL`): the journal tells no one of a
        change. If this process takes the task meanwhile, wait for it here; a remote
        task in another process's outbox, once Redis has it, is waited for there."""
        runner = self._runner
        assert runner.journal is not None
        deadline = trio.current_time() + (math.inf if timeout is None else timeout)
        pause = 0.05
        while True:
            remote = runner.remote
            if remote is not None and (row is None or row.name.startswith(REMOTE_PREFIX)):
                # A remote task in another process's outbox: once handed off, its row
                # goes when a worker took it, and Redis tells the rest.
                told = await _asked_redis(remote_status(remote.handoff.worker, id))
                if told is not None:
                    if told.ended:
                        return told
                    left = None if timeout is None else max(0.0, deadline - trio.current_time())
                    return await wait_remote(remote.handoff.worker, id, left)
            if row is None:
                raise LookupError(
                    f"background task {id} ended, and the journal keeps no status of it "
                    f"(see journal_statuses_kept_for)"
                )
            status = row_status(row)
            if status.ended:
                return status
            if runner.statuses.find(id) is not None:
                return await runner.statuses.wait(id, max(0.0, deadline - trio.current_time()))
            if trio.current_time() >= deadline:
                raise TimeoutError(f"background task {id} has not ended after {timeout}s")
            await trio.sleep_until(min(deadline, trio.current_time() + pause))
            pause = min(2 * pause, JOURNAL_POLL)
            row = await runner.journal.journal.find(id)

    async def cancel_task(self, id: str) -> bool:
        """See `BackgroundNursery.cancel_task`."""
        await trio.lowlevel.checkpoint()
        runner = self._runner
        task = runner.statuses.live.get(_checked(id))
        if task is None or sent(task):
            if not _elsewhere(id, runner.statuses.status(id)):
                return False
            # The workers' now (or another web process's): abort it there.
            remote = runner.remote
            if remote is not None and await _asked_redis(abort_remote(remote.handoff.worker, id)):
                return True
            if task is None and runner.journal is not None:
                # Another process's durable task: only one nobody has claimed is reachable.
                return await runner.journal.journal.withdraw(id)
            return False
        if not task.is_async and task in runner.threads:
            # Taken back if no thread has started it; a running thread goes on.
            task.cancel_requested = True  # (first: taking it back ends it, cancelled)
            task.cancel_requested = runner.threads.take_back(task)
            return task.cancel_requested
        if task.state == "running" and not task.is_async:
            return False
        task.cancel_requested = True
        if task.scope is not None:  # running, or waiting out its backoff
            task.scope.cancel()
        else:
            runner.drop_queued({task})
        # Else it has not reached its slot yet (collected by a request still answering,
        # being stored, its start being recorded): it ends cancelled when it gets there.
        return True

    async def list_tasks(
        self, *, state: TaskState | None = None, name: str | None = None, limit: int = 1000
    ) -> list[TaskStatus]:
        """See `BackgroundNursery.list_tasks`."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, not {limit!r}")
        await trio.lowlevel.checkpoint()
        return list(itertools.islice(self._runner.statuses.select(state, name), limit))


def row_status(row: Row | EndedRow) -> TaskStatus:
    """The status a journal row tells of its task: ``dead`` (a dead letter),
    ``running`` (its attempt started), ``pending`` (claimed by a live process) or
    ``deferred`` (nobody's: the next process to start takes it); or, kept once it
    ended, ``completed`` or ``cancelled``."""
    if isinstance(row, EndedRow):
        return TaskStatus(
            id=row.task_id,
            name=row.name,
            state="cancelled" if row.state == "cancelled" else "completed",
            attempt=row.attempt,
            progress=row.progress,
            message=row.message,
            result=_decoded(row.result),
            error=row.error,
            created_at=utc(row.created),
            started_at=utc(row.started),
            ended_at=utc(row.ended),
        )
    state: TaskState
    if row.state == "dead":
        state = "dead"
    elif row.owner is None:
        state = "deferred"  # (even if its run had started: that process died)
    else:
        state = "running" if row.started else "pending"
    return TaskStatus(
        id=row.task_id or "",
        name=row.name,
        state=state,
        attempt=row.attempt,
        progress=row.progress,
        message=row.message,
        error=row.error,
        created_at=utc(row.created),
    )


def _decoded(result: str | None) -> Any:
    """A result's JSON text as kept in the journal, decoded (None if it is not JSON: a
    row written by hand)."""
    try:
        return None if result is None else json.loads(result)
    except ValueError:
        return None


def _checked(id: object) -> str:
    if not isinstance(id, str):
        raise TypeError(f"a task id is a str (TaskHandle.id), not {id!r}")
    return id


def _elsewhere(id: str, status: TaskStatus | None) -> bool:
    """Whether Redis or the journal may know more of ``id`` than this process, which
    does not know it, or handed it off; only an id's shape is worth asking about."""
    return (status is None or status.state == "handed_off") and looks_like_id(id)


async def _asked_redis(question: Awaitable[T]) -> T | None:
    """The answer to ``question`` for Redis, or None if Redis could not answer (it is
    logged: a status lookup never fails for want of Redis)."""
    try:
        return await question
    except Exception as error:
        logger.warning("could not ask Redis about a remote task: %r", error)
        return None
