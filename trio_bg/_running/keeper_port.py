"""The nursery as the keepers of its durable and remote tasks see it: a `NurseryPort`
over its `TaskRunner`, and nothing more."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._engine.events import Outcome
    from .._engine.tasks import Task
    from .runner import TaskRunner


class KeeperPort:
    """What the journal's feeder and the Redis forwarder may do to a nursery (see
    `trio_bg._keeping.port.NurseryPort` for each)."""

    __slots__ = ("_runner",)

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    @property
    def closed(self) -> bool:
        return self._runner.closed

    @property
    def cancelled(self) -> bool:
        return self._runner.nursery.cancel_scope.cancel_called

    def room(self, limit: int) -> int:
        return limit - self._runner.books.in_hand

    def take(self, task: Task) -> None:
        self._runner.take(task)

    def launch(self, task: Task) -> None:
        self._runner.launch(task)

    def attempt_over(self, task: Task, outcome: Outcome) -> None:
        self._runner.attempt_over(task, outcome)

    def hold(self, task: Task) -> None:
        self._runner.books.pending += 1

    def release(self, task: Task, outcome: Outcome) -> None:
        self._runner.books.pending -= 1
        self._runner.end(task, outcome)

    def end(self, task: Task, outcome: Outcome) -> None:
        self._runner.end(task, outcome)

    def drop_queued(self, tasks: set[Task]) -> None:
        self._runner.drop_queued(tasks)
