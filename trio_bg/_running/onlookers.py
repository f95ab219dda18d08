"""Who hears of a nursery's tasks: the ``on_event`` and ``on_error`` hooks, tracing, the
debug log and the test kit; and the stop that a task's KeyboardInterrupt or SystemExit
asks for."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._engine.events import EventKind, Outcome, TaskEvent
from .._engine.tasks import Task
from .options import Settings

if TYPE_CHECKING:
    from .._engine.recorder import TaskRecorder
    from .._engine.tracing import TaskTracer

logger = logging.getLogger("trio_bg")

_PROCESS_STOPPERS = (KeyboardInterrupt, SystemExit)


class Onlookers:
    """Tells everyone who looks what became of each task, and never lets a hook break
    the nursery. A KeyboardInterrupt or SystemExit (from a task or a hook) is kept in
    `fatal`, and ``stop(again)`` is called: ``again`` when one was kept already."""

    __slots__ = ("_settings", "_stop", "fatal", "recorder", "tracer", "watchers")

    def __init__(self, settings: Settings, stop: Callable[[bool], None]) -> None:
        self._settings = settings
        self._stop = stop
        self.fatal: BaseException | None = None
        # trio_bg.testing listens here to fail the test on a task's error.
        self.watchers: list[Callable[[str, BaseException], object]] = []
        self.tracer: TaskTracer | None = None
        # Made when a dashboard or metrics app first asks for it: till then, nothing.
        self.recorder: TaskRecorder | None = None
        if settings.tracing:
            from .._engine.tracing import TaskTracer  # OpenTelemetry: only when asked for

            self.tracer = TaskTracer()

    def observed(self) -> bool:
        """Whether anyone looks at task events (a hook, tracing, a recorder, or the
        debug log)."""
        settings = self._settings
        return (
            settings.on_event is not None
            or settings.tracing
            or self.recorder is not None
            or logger.isEnabledFor(logging.DEBUG)
        )

    def emit(
        self,
        kind: EventKind,
        task: Task,
        *,
        waited: float | None = None,
        outcome: Outcome | None = None,
        duration: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Tell the debug log, tracing, the recorder and the ``on_event`` hook of
        ``task``'s step."""
        if (recorder := self.recorder) is not None:
            if kind == "started":
                recorder.started(task.name, waited)
            elif kind == "finished" and outcome is not None:
                recorder.finished(task.name, outcome, duration)
        hook = self._settings.on_event
        event = TaskEvent(
            kind,
            task.name,
            waited=waited,
            outcome=outcome,
            duration=duration,
            attempt=task.attempt,
            delay=delay,
            id=task.id,
        )
        logger.debug("background task %s", event)
        if self.tracer is not None:
            self.tracer.record(task, event)
        if hook is None:
            return
        try:
            hook(event)
        except BaseException as error:  # a hook never breaks the nursery
            self._hook_failed("on_event", task, error)

    def failed(self, task: Task, exc: BaseException) -> None:
        """``task`` failed for good: log it, and tell tracing, the watchers and the
        ``on_error`` hook."""
        logger.error(
            "background task %s [%s] failed%s", task.name, task.id, attempt_of(task), exc_info=exc
        )
        if self.tracer is not None:
            self.tracer.record_failure(task, exc)
        for watcher in self.watchers:
            watcher(task.name, exc)
        if _stops_the_process(exc):
            self._stop_for(exc, f"background task {task.name}")
        hook = self._settings.on_error
        if hook is None:
            return
        try:
            hook(task.name, exc)
        except BaseException as error:  # a hook never breaks the nursery
            self._hook_failed("on_error", task, error)

    def _hook_failed(self, hook: str, task: Task, error: BaseException) -> None:
        logger.error(
            "the %s hook failed for background task %s [%s]",
            hook,
            task.name,
            task.id,
            exc_info=error,
        )
        if _stops_the_process(error):
            self._stop_for(error, f"the {hook} hook")

    def _stop_for(self, exc: BaseException, culprit: str) -> None:
        if self.fatal is not None:
            logger.critical("%s raised %s as well: cancelling the rest now", culprit, _kind(exc))
            self._stop(True)
            return
        self.fatal = exc
        logger.critical(
            "%s raised %s: shutting the background tasks down (drain for up to %ss, cancel, "
            "report); it is raised again after that",
            culprit,
            _kind(exc),
            self._settings.grace_period,
        )
        self._stop(False)


def attempt_of(task: Task) -> str:
    """Which attempt ended a task that has retries, for its log line."""
    return f" (attempt {task.attempt} of {task.retries + 1})" if task.retries else ""


def _stops_the_process(exc: BaseException) -> bool:
    """Whether ``exc`` is (or holds) a KeyboardInterrupt or SystemExit."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(_PROCESS_STOPPERS) is not None
    return isinstance(exc, _PROCESS_STOPPERS)


def _kind(exc: BaseException) -> str:
    return repr(exc) if isinstance(exc, SystemExit) else type(exc).__name__
