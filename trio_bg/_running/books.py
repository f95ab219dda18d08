"""A nursery's books: how many of its tasks are in each state, how many ended each way,
and waiting for the live ones to fall to zero. Only trio's thread writes them, except
`admitted`, `rejected` and `deduplicated`, written under the admission lock (admissions
happen in worker threads too)."""

from __future__ import annotations

import trio

from .._engine.events import Outcome


class Books:
    """The counts `TaskStats` and `ShutdownReport` are made of."""

    __slots__ = (
        "_idle",
        "abandoned",
        "accepted",
        "admitted",
        "cancelled",
        "cancelled_on_request",
        "completed",
        "deduplicated",
        "discarded",
        "failed",
        "handed_off",
        "keeping",
        "pending",
        "rejected",
        "released",
        "retried",
        "retrying",
        "running",
        "timed_out",
        "unconfirmed",
    )

    def __init__(self) -> None:
        # Tasks admitted and not yet ended or discarded: admitted - released. Admission
        # may happen in worker threads (sync handlers), so admitted changes under the
        # lock; only trio's thread releases, so released needs none (an admission that
        # reads it a moment early only errs on the safe side).
        self.admitted = self.released = 0
        # pending counts the tasks queued or waiting for a retry (of those, retrying
        # wait for a retry: they hold no running slot). running counts the tasks
        # holding a running slot (of those, thread tasks no worker thread has started
        # yet are shown as pending).
        self.accepted = self.pending = self.running = 0
        # Tasks added outside a request that are being stored in the journal (or handed
        # to Redis) before they are accepted: shown as reserved, waited for when idle.
        self.keeping = 0
        self.completed = self.failed = self.timed_out = 0
        self.cancelled = self.abandoned = self.discarded = self.rejected = 0
        self.retrying = self.retried = 0
        # Calls that added nothing (a live task had their id), and the cancelled tasks
        # that cancel_task cancelled.
        self.deduplicated = self.cancelled_on_request = 0
        # Remote tasks Redis acknowledged (the workers' now), and those whose hand-off
        # got no answer (Redis may have them: never counted discarded).
        self.handed_off = self.unconfirmed = 0
        self._idle: trio.Event | None = None  # set when busy turns False, if awaited

    @property
    def in_hand(self) -> int:
        """Tasks admitted and not yet ended or discarded."""
        return self.admitted - self.released

    @property
    def busy(self) -> bool:
        """Whether a task is pending or running, or being kept before it is accepted."""
        return bool(self.pending or self.running or self.keeping)

    def ended(self, outcome: Outcome) -> None:
        """Count an accepted task that ended with ``outcome``, releasing its room."""
        self.released += 1
        if outcome == "completed":
            self.completed += 1
        elif outcome == "failed":
            self.failed += 1
        elif outcome == "timed_out":
            self.timed_out += 1
        elif outcome == "handed_off":
            self.handed_off += 1
        elif outcome == "cancelled":
            self.cancelled += 1
        else:
            self.abandoned += 1

    def totals(self) -> dict[str, int]:
        """The totals `TaskStats` and `ShutdownReport` share."""
        return {
            "accepted": self.accepted,
            "completed": self.completed,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "abandoned": self.abandoned,
            "discarded": self.discarded,
            "handed_off": self.handed_off,
            "unconfirmed": self.unconfirmed,
            "deduplicated": self.deduplicated,
            "cancelled_on_request": self.cancelled_on_request,
        }

    def tell_idle(self) -> None:
        """Wake `wait_idle` and `wait_drained` if they may return now."""
        if self._idle is not None and not self.busy:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no task is pending or running, nor being kept to be accepted."""
        while self.busy:
            await self._next_idle()
        await trio.lowlevel.checkpoint()

    async def wait_drained(self) -> None:
        """Return once nothing is in hand: no task pending or running, nor admitted by a
        request still in flight (whose tasks are not handed off yet)."""
        while self.in_hand:
            await self._next_idle()
        await trio.lowlevel.checkpoint()

    async def _next_idle(self) -> None:
        if self._idle is None or self._idle.is_set():
            self._idle = trio.Event()
        await self._idle.wait()
