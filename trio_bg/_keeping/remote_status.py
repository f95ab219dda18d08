"""What Redis says of a remote task, by its id (the streaq task id is the task's own):
its status and result as a `TaskStatus`, waiting for its end, and aborting it.

streaq's statuses map so: ``queued`` and ``scheduled`` are ``handed_off`` (in the
queue), ``running`` is ``running``, ``done`` is ``completed`` or, from the error the
worker stored, ``failed``, ``timed_out`` or ``cancelled`` (aborted); ``missing`` is no
status at all (None)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import trio

from .._engine.status import TaskState, TaskStatus, encode_result, utc
from .remote_progress import read_progress

_ENDED_AS: dict[str, TaskState] = {
    "StreaqCancelled": "cancelled",
    "TimeoutError": "timed_out",
}


async def remote_status(worker: Any, task_id: str) -> TaskStatus | None:
    """The status Redis holds for ``task_id`` (None: it has none)."""
    status = str(await worker.status_by_id(task_id))
    if status == "done":
        raw = await worker.redis.get(worker.results_key + task_id)
        if raw is None:
            return None
        ended = _ended(task_id, await worker.deserialize(raw))
        progress, message = await read_progress(worker, task_id)
        return dataclasses.replace(ended, progress=progress, message=message)
    if status not in ("queued", "scheduled", "running"):
        return None
    info = await worker.info_by_id(task_id)
    progress, message = await read_progress(worker, task_id)
    return TaskStatus(
        id=task_id,
        name=info.fn_name if info is not None else "",
        state="running" if status == "running" else "handed_off",
        attempt=max(1, info.tries) if info is not None else 1,
        progress=progress,
        message=message,
        created_at=None if info is None else utc(info.created_time / 1000),
    )


async def wait_remote(worker: Any, task_id: str, timeout: float | None) -> TaskStatus:
    """Return ``task_id``'s status once its worker has stored its result; the built-in
    `TimeoutError` after ``timeout`` seconds."""
    with trio.move_on_after(math.inf if timeout is None else timeout):
        result = await worker.result_by_id(task_id)
        progress, message = await read_progress(worker, task_id)
        return TaskStatus(
            id=task_id,
            name=result.fn_name,
            state="completed" if result.success else _failure(result.exception),
            attempt=result.tries,
            progress=progress,
            message=message,
            result=_json(result.result) if result.success else None,
            error=None if result.success else _error(result.exception),
            created_at=utc(result.created_time / 1000),
            started_at=utc(result.start_time / 1000),
            ended_at=utc(result.finish_time / 1000),
        )
    raise TimeoutError(f"remote task {task_id} has not ended after {timeout}s")


async def abort_remote(worker: Any, task_id: str) -> bool:
    """Ask the workers to abort ``task_id``: True if it was taken out of the delayed
    queue, or a worker stored it as cancelled within 5 s. (streaq's own wait for that
    looks for an exception object, which a JSON worker stores as a record.)"""
    if str(await worker.status_by_id(task_id)) in ("missing", "done"):
        return False  # (nothing to abort: no id left in streaq's abort set for nothing)
    if await worker.abort_by_id(task_id, timeout=0):
        return True
    try:
        ended = await wait_remote(worker, task_id, 5)
    except TimeoutError:
        return False
    return ended.state == "cancelled"


def _ended(task_id: str, data: dict[str, Any]) -> TaskStatus:
    success = bool(data.get("s"))
    value = data.get("r")
    return TaskStatus(
        id=task_id,
        name=str(data.get("f", "")),
        state="completed" if success else _failure(value),
        attempt=int(data.get("t") or 1),
        result=_json(value) if success else None,
        error=None if success else _error(value),
        created_at=_ms(data.get("ct")),
        started_at=_ms(data.get("st")),
        ended_at=_ms(data.get("ft")),
    )


def _failure(value: object) -> TaskState:
    kind = value.get("error") if isinstance(value, dict) else type(value).__name__
    return _ENDED_AS.get(str(kind), "failed")


def _error(value: object) -> str:
    if isinstance(value, dict) and "error" in value:
        message = value.get("message")
        return f"{value['error']}: {message}" if message else str(value["error"])
    if isinstance(value, BaseException):
        return f"{type(value).__qualname__}: {value}" if str(value) else type(value).__qualname__
    return str(value)


def _json(value: object) -> object:
    text = encode_result(value)
    return None if text is None else json.loads(text)


def _ms(value: object) -> Any:
    return utc(value / 1000) if isinstance(value, int | float) else None
