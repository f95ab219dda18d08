"""Lifecycle events: what a nursery tells an ``on_event`` hook (and its debug log)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EventKind = Literal["accepted", "started", "retrying", "finished"]
Outcome = Literal["completed", "failed", "timed_out", "cancelled", "abandoned", "handed_off"]


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One step in the life of a background task.

    ``kind`` is ``"accepted"`` (handed to the nursery), ``"started"`` (it got a
    running slot; ``waited`` is how long it was pending), ``"retrying"`` (the attempt
    ended with ``outcome`` ``"failed"`` or ``"timed_out"`` after ``duration``, and the
    task runs again in ``delay`` seconds) or ``"finished"``, once, at the end
    (``outcome`` says how; ``duration`` is how long its last attempt ran). A remote
    task's life here is ``"accepted"``, then ``"finished"`` with ``"handed_off"``
    once its worker's queue in Redis has it.
    ``attempt`` is the run the event is about: 1, then 2 once a retry is due. Times
    are seconds of trio's clock. ``id`` is the task's id (as its `TaskHandle` has
    it). The task's arguments are never part of an event.
    """

    kind: EventKind
    name: str
    waited: float | None = None
    outcome: Outcome | None = None
    duration: float | None = None
    attempt: int = 1
    delay: float | None = None
    id: str | None = None
