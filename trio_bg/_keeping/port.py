"""What a nursery lets the keepers of its durable and remote tasks do: the narrow way
in from the journal's feeder and the Redis forwarder. Everything here runs in trio's
thread."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._engine.events import Outcome
    from .._engine.tasks import Task


class NurseryPort(Protocol):
    """The nursery, as its keepers see it."""

    @property
    def closed(self) -> bool:
        """Whether the shutdown has begun (nothing new is taken)."""

    @property
    def cancelled(self) -> bool:
        """Whether the grace period is over and the tasks are being cancelled."""

    def room(self, limit: int) -> int:
        """How many more tasks may be admitted before ``limit`` are in hand."""

    def take(self, task: Task) -> None:
        """Admit (room was counted) and accept ``task``, taken from the journal."""

    def launch(self, task: Task) -> None:
        """Run ``task``, which holds a running slot, now."""

    def attempt_over(self, task: Task, outcome: Outcome) -> None:
        """``task`` holds a running slot but its attempt never started: it ends so."""

    def hold(self, task: Task) -> None:
        """``task`` waits (pending) for its keeper, holding no running slot."""

    def release(self, task: Task, outcome: Outcome) -> None:
        """A task that `hold` kept waiting ends with ``outcome``."""

    def end(self, task: Task, outcome: Outcome) -> None:
        """An accepted task that holds nothing ends with ``outcome``."""

    def drop_queued(self, tasks: set[Task]) -> None:
        """Those of ``tasks`` that wait for a running slot end cancelled, unrun."""
