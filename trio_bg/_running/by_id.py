"""What a task's id answers: its status, its end, its cancellation, and the statuses
by state and name."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

import trio

from .._engine.status import STATES, TaskState, TaskStatus, utc
from .._engine.tasks import Task, sent
from .._keeping.journal_file import Row
from .._keeping.remote_status import abort_remote, remote_status, wait_remote

if TYPE_CHECKING:
    from .runner import TaskRunner

T = TypeVar("T")

logger = logging.getLogger("trio_bg")


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
        """See `BackgroundNursery.task_status`: this process's statuses first, then the
        journal's rows (the durable tasks of every process that shares it)."""
        runner = self._runner
        status = runner.statuses.status(id)
        if not _could_be_an_id(id) or (status is not None and status.state != "handed_off"):
            await trio.lowlevel.checkpoint()
            return status
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
        status = runner.statuses.status(id)
        remote = runner.remote
        if (
            remote is not None
            and _could_be_an_id(id)
            and (status is None or status.state == "handed_off")
        ):
            told = await _asked_redis(remote_status(remote.handoff.worker, id))
            if told is not None:
                if told.ended:
                    return told
                return await wait_remote(remote.handoff.worker, id, timeout)
            if status is not None:
                return status  # handed off, and Redis cannot say more now
        journal = runner.journal
        if (
            status is None
            and journal is not None
            and _could_be_an_id(id)
            and await journal.journal.find(id) is not None
        ):
            raise LookupError(
                f"background task {id} is another process's (its row is in the journal: "
                f"task_status reads it)"
            )
        return await runner.statuses.wait(id, timeout)

    async def cancel_task(self, id: str) -> bool:
        """See `BackgroundNursery.cancel_task`."""
        await trio.lowlevel.checkpoint()
        runner = self._runner
        task = runner.statuses.live.get(id)
        if task is None or sent(task):
            if not _could_be_an_id(id):
                return False
            status = runner.statuses.status(id)
            if runner.remote is not None and (status is None or status.state == "handed_off"):
                # The workers' now (or another web process's): abort it there.
                worker = runner.remote.handoff.worker
                if await _asked_redis(abort_remote(worker, id)):
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
        await trio.lowlevel.checkpoint()
        return list(itertools.islice(self._runner.statuses.select(state, name), limit))


def row_status(row: Row) -> TaskStatus:
    """The status a journal row tells of its task: ``dead`` (a dead letter),
    ``running`` (its attempt started), ``pending`` (claimed by a live process) or
    ``deferred`` (nobody's: the next process to start takes it)."""
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


def _could_be_an_id(text: str) -> bool:
    """Whether ``text`` has an id's shape (32 hex digits): no journal read otherwise."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


async def _asked_redis(question: Awaitable[T]) -> T | None:
    """The answer to ``question`` for Redis, or None if Redis could not answer (it is
    logged: a status lookup never fails for want of Redis)."""
    try:
        return await question
    except Exception as error:
        logger.warning("could not ask Redis about a remote task: %r", error)
        return None
