"""What a task is called and what became of it: `TaskHandle`, `TaskStatus`, the states,
and the making of ids (random, or derived from a deduplication key)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, get_args

TaskState = Literal[
    "pending",
    "running",
    "retrying",
    "completed",
    "failed",
    "timed_out",
    "cancelled",
    "abandoned",
    "deferred",
    "handed_off",
    "dead",
]
"""Where a task is in its life (see `TaskStatus`)."""

STATES: tuple[TaskState, ...] = get_args(TaskState)
LIVE_STATES = frozenset(("pending", "running", "retrying", "deferred"))
"""The states in which a task's deduplication key holds."""

RESULT_LIMIT = 65_536
"""The largest JSON text (characters) of a task's return value kept as its ``result``."""

MESSAGE_LIMIT = 1_000
"""The longest progress ``message`` kept (longer ones are cut, with an ellipsis)."""


class TaskHandle(NamedTuple):
    """The task that `BackgroundTasks.add_task` or `BackgroundNursery.start_soon`
    added (or, for a deduplication key already in use, the task that holds it).

    ``id`` names it everywhere: `task_status`, `wait_task` and `cancel_task`, the
    journal (``python -m trio_bg journal ls|retry|purge``) and Redis. ``name`` is the
    name it reports under. (A named tuple: made for every task, it must be cheap.)
    """

    id: str
    name: str

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """What became of a task, as `task_status` and `wait_task` tell it.

    ``state`` is one of: ``pending`` (accepted, waiting for a running slot, or
    collected by a request whose response has not completed), ``running``,
    ``retrying`` (an attempt failed or timed out; it waits out its backoff),
    ``deferred`` (a durable task kept in the journal for a later start),
    ``handed_off`` (a remote task in its streaq worker's queue), and the ends:
    ``completed``, ``failed``, ``timed_out``, ``cancelled`` (by `cancel_task`, by
    the shutdown, or discarded with its request: it never ran to its end),
    ``abandoned`` (a plain-function task left running in its thread at shutdown)
    and ``dead`` (a durable task whose retries or crash limit ran out: a dead
    letter in the journal). ``attempt`` counts from 1. ``progress`` (0 to 1) and
    ``message`` are the task's own `set_progress`. ``result`` is the return value,
    when it is JSON of at most `RESULT_LIMIT` characters (else None); ``error`` is
    the exception's type and message, never the arguments. The times are
    timezone-aware UTC datetimes, or None before the task got there.
    """

    id: str
    name: str
    state: TaskState
    attempt: int = 1
    progress: float | None = None
    message: str | None = None
    result: Any = None
    error: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def ended(self) -> bool:
        """Whether the task has ended (it will not run again here)."""
        return self.state not in LIVE_STATES and self.state != "handed_off"

    def as_dict(self) -> dict[str, Any]:
        """This status as JSON-ready values (the times in ISO 8601, UTC)."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "attempt": self.attempt,
            "progress": self.progress,
            "message": self.message,
            "result": self.result,
            "error": self.error,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
        }


def new_id() -> str:
    """A random id: 128 bits from the OS, as 32 hex digits. (Drawn 64 at a time: one
    system call for many tasks; a forked child starts with none of its parent's.)"""
    try:
        return _ids.pop()
    except IndexError:
        batch = os.urandom(16 * _ID_BATCH).hex()
        _ids.extend(batch[i : i + 32] for i in range(0, len(batch), 32))
        return _ids.pop()


_ID_BATCH = 64
_ids: list[str] = []  # list.pop and extend are atomic: safe from worker threads too
os.register_at_fork(after_in_child=_ids.clear)


def looks_like_id(text: str) -> bool:
    """Whether ``text`` has an id's shape: 32 lowercase hex digits."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def keyed_id(name: str, key: str) -> str:
    """The id of task ``name`` with deduplication ``key``: the same in every process."""
    digest = hashlib.sha256(f"{name}\x00{key}".encode(errors="surrogatepass")).hexdigest()
    return digest[:32]


def encode_result(value: object) -> str | None:
    """``value`` as the JSON text kept for a task's ``result``, or None when it is not
    JSON (or longer than `RESULT_LIMIT`)."""
    if value is None:
        return None
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except Exception:  # not JSON; or an object whose own code raised: never the task's end
        return None
    return text if len(text) <= RESULT_LIMIT else None


def describe_error(error: BaseException) -> str:
    """``error`` as a status shows it: its type and message (no traceback, no
    arguments)."""
    kind = type(error).__qualname__
    try:
        text = str(error)
    except Exception:  # its own __str__ broke: the type says enough
        return kind
    return f"{kind}: {text}" if text else kind


def checked_progress(fraction: object, message: object) -> tuple[float | None, str | None]:
    """`set_progress`'s arguments, checked: `TypeError` or `ValueError` early."""
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"set_progress(): fraction must be a number or None, not {fraction!r}")
        if not (0 <= fraction <= 1 and math.isfinite(fraction)):
            raise ValueError(f"set_progress(): fraction must be between 0 and 1, not {fraction!r}")
        fraction = float(fraction)
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(f"set_progress(): message must be a str or None, not {message!r}")
        if len(message) > MESSAGE_LIMIT:
            message = message[: MESSAGE_LIMIT - 1] + "…"
    return fraction, message


def utc(timestamp: float | None) -> datetime | None:
    """A wall-clock ``time.time()`` as a timezone-aware UTC datetime."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
