"""What a task's id answers: its status, its end, its cancellation, and the statuses
by state and name."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import trio

from .._engine.status import STATES, TaskState, TaskStatus
from .._engine.tasks import sent

if TYPE_CHECKING:
    from .runner import TaskRunner


class TasksById:
    """A nursery's tasks, looked up by id (its `BackgroundNursery` methods of the
    same names, and the module functions, ask here)."""

    __slots__ = ("_runner",)

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    async def task_status(self, id: str) -> TaskStatus | None:
        """See `BackgroundNursery.task_status`."""
        await trio.lowlevel.checkpoint()
        return self._runner.statuses.status(id)

    async def wait_task(self, id: str, timeout: float | None = None) -> TaskStatus:
        """See `BackgroundNursery.wait_task`."""
        return await self._runner.statuses.wait(id, timeout)

    async def cancel_task(self, id: str) -> bool:
        """See `BackgroundNursery.cancel_task`."""
        await trio.lowlevel.checkpoint()
        runner = self._runner
        task = runner.statuses.live.get(id)
        if task is None or sent(task):
            return False
        if not task.is_async and task in runner.threads:
            # Taken back if no thread has started it; a running thread goes on.
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
