"""The small frozen records a nursery gives out: live counts and the shutdown report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskStats:
    """Counts of a nursery's tasks by state, taken at one moment.

    ``accepted`` counts every task the nursery took; each of them is in exactly one of
    the other states, so ``accepted == pending + running + completed + failed +
    cancelled + abandoned`` always holds. ``discarded`` counts tasks collected by a
    request whose response never completed: they were never accepted and never ran.
    """

    accepted: int = 0
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    abandoned: int = 0
    discarded: int = 0

    @property
    def finished(self) -> int:
        """Tasks that reached a final state."""
        return self.completed + self.failed + self.cancelled + self.abandoned


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What a nursery's shutdown did to every task it had accepted.

    The counts have the same names as `TaskStats`; after a shutdown nothing is
    pending or running any more. ``unfinished`` names, one entry per task, the tasks
    the shutdown cut short (cancelled before or while running, or abandoned in their
    thread); failed tasks are counted in ``failed`` and were logged when they failed.
    ``duration`` is how long the shutdown took, in seconds of trio's clock.
    """

    accepted: int
    completed: int
    failed: int
    cancelled: int
    abandoned: int
    discarded: int
    unfinished: tuple[str, ...]
    duration: float

    @property
    def all_completed(self) -> bool:
        """True when every accepted task ran to completion."""
        return self.completed == self.accepted

    def __str__(self) -> str:
        counts = ", ".join(
            f"{count} {state}"
            for state, count in (
                ("completed", self.completed),
                ("failed", self.failed),
                ("cancelled", self.cancelled),
                ("abandoned", self.abandoned),
                ("discarded", self.discarded),
            )
            if count
        )
        return (
            f"{self.accepted} accepted"
            + (f" ({counts})" if counts else "")
            + f" in {self.duration:.3f}s"
        )
