"""The module functions for one task, `task_status`, `wait_task` and `cancel_task`, which
find the nursery that serves the request or task they are called in; and
`set_progress`, inside a running task."""

from __future__ import annotations

from .._engine.status import TaskStatus, checked_progress
from .._engine.tasks import remote_progress, running_task
from .._running.by_id import TasksById
from .._running.nursery import BackgroundNursery, tasks_by_id
from .collection import collection_of, current_collection


async def task_status(id: str) -> TaskStatus | None:
    """The `TaskStatus` of task ``id`` (see `BackgroundNursery.task_status`), asked of
    the nursery that serves this request or task."""
    return await _serving("task_status").task_status(id)


async def wait_task(id: str, timeout: float | None = None) -> TaskStatus:
    """Wait for task ``id`` to end (see `BackgroundNursery.wait_task`), asked of the
    nursery that serves this request or task."""
    return await _serving("wait_task").wait_task(id, timeout)


async def cancel_task(id: str) -> bool:
    """Cancel task ``id`` (see `BackgroundNursery.cancel_task`), asked of the nursery
    that serves this request or task."""
    return await _serving("cancel_task").cancel_task(id)


def set_progress(fraction: float | None = None, message: str | None = None) -> None:
    """Say how far the running task has got: ``fraction`` (0 to 1) and a ``message``,
    shown in its `TaskStatus`. Call it inside a background task, ``async def`` or
    plain (from its worker thread); `RuntimeError` elsewhere. Each call replaces
    both."""
    fraction, message = checked_progress(fraction, message)
    task = running_task.get(None)
    if task is None and (write := remote_progress.get(None)) is not None:
        write(fraction, message)  # a remote task, on its streaq worker: to Redis
        return
    if task is None:
        raise RuntimeError(
            "trio_bg.set_progress() was called outside a background task: call it in a "
            "function run by add_task or start_soon"
        )
    task.progress = fraction
    task.message = message
    if isinstance(task.home, TasksById):
        task.home.progressed(task)


def serving_nursery(what: str) -> BackgroundNursery:
    """The nursery that serves the request this is called in; a clear `RuntimeError`
    naming ``what`` (that asked for it) elsewhere."""
    tasks = current_collection.get(None)
    if tasks is not None:
        sink = collection_of(tasks).sink
        if isinstance(sink, BackgroundNursery):
            return sink
    raise RuntimeError(
        f"{what} reads the nursery that serves the request, and there is none here: "
        f"mount it in an app served by trio_bg.BackgroundTaskMiddleware (or trio_bg.serve)"
    )


def _serving(verb: str) -> TasksById:
    task = running_task.get(None)
    if task is not None and isinstance(task.home, TasksById):
        return task.home
    tasks = current_collection.get(None)
    if tasks is not None:
        sink = collection_of(tasks).sink
        if isinstance(sink, BackgroundNursery):
            return tasks_by_id(sink)
    raise RuntimeError(
        f"trio_bg.{verb}() asks the nursery that serves the request or task it is called "
        f"in, and there is none here: call it while handling a request served by "
        f"trio_bg.BackgroundTaskMiddleware, or in a background task (elsewhere, use "
        f"BackgroundNursery.{verb})"
    )
