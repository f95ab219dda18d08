"""The test kit's common part: background tasks' failures, watched from the app's startup
on and raised again in the test. No dependency beyond trio_bg (the clients bring theirs)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TypeVar, overload

from .._engine.report import ShutdownReport, TaskStats
from .._running.nursery import BackgroundNursery
from .._web.middleware import FAILURE_WATCHERS_KEY, BackgroundTaskMiddleware

_E = TypeVar("_E", bound=Exception)
_BE = TypeVar("_BE", bound=BaseException)


class TaskFailures(ExceptionGroup[Exception]):
    """Several background tasks failed; each is one of the group's exceptions."""

    @overload
    def derive(self, excs: Sequence[_E], /) -> ExceptionGroup[_E]: ...
    @overload
    def derive(self, excs: Sequence[_BE], /) -> BaseExceptionGroup[_BE]: ...
    def derive(self, excs: Sequence[BaseException], /) -> BaseExceptionGroup[BaseException]:
        """Keep the type when the group is split (as trio's nurseries do on the way
        out of the test client's block), so ``pytest.raises(TaskFailures)`` holds."""
        if all(isinstance(exc, Exception) for exc in excs):
            return TaskFailures(self.message, excs)  # type: ignore[arg-type]
        return BaseExceptionGroup(self.message, excs)


TaskFailures.__module__ = "trio_bg.testing"  # where users import it from


class FailureWatch:
    """The failures of an app's background tasks, for one test client.

    Put `lifespan_state` into the lifespan scope's ``state``: the middleware attaches
    the watch to its nursery before the app's own startup runs, so a task started by
    that startup is watched too.
    """

    __slots__ = ("_lock", "_unraised", "raise_task_errors", "seen")

    def __init__(self, *, raise_task_errors: bool) -> None:
        self.raise_task_errors = raise_task_errors
        self.seen: list[tuple[str, Exception]] = []
        self._unraised: list[Exception] = []
        # Failures arrive in trio's thread; a sync test client raises them in its own.
        self._lock = threading.Lock()

    def __call__(self, name: str, exc: BaseException) -> None:
        if isinstance(exc, Exception):  # the rest (KeyboardInterrupt...) propagates anyway
            with self._lock:
                self.seen.append((name, exc))
                self._unraised.append(exc)

    def lifespan_state(self) -> dict[str, Any]:
        """A lifespan ``state`` that has the middleware report failures here."""
        return {FAILURE_WATCHERS_KEY: [self]}

    def raise_unraised(self) -> None:
        """Raise the failures not raised yet (one as itself, with the traceback it had
        in its task; several as `TaskFailures`), unless ``raise_task_errors`` is off."""
        with self._lock:
            failures, self._unraised = self._unraised, []
        if not self.raise_task_errors or not failures:
            return
        if len(failures) == 1:
            raise failures[0]
        raise TaskFailures(f"{len(failures)} background tasks failed", failures)


class WatchesTasks:
    """What every trio_bg test client shows of the app's background tasks (the async
    `trio_bg.testing.TestClient`, Starlette's sync one, Quart's test app): it needs
    ``_failures`` and a ``_watched_middleware()``."""

    _failures: FailureWatch

    def _watched_middleware(self) -> BackgroundTaskMiddleware:
        raise NotImplementedError

    @property
    def raise_task_errors(self) -> bool:
        """Whether a failed background task is raised (at `drain`, and at the end)."""
        return self._failures.raise_task_errors

    @raise_task_errors.setter
    def raise_task_errors(self, value: bool) -> None:
        self._failures.raise_task_errors = value

    @property
    def task_errors(self) -> list[tuple[str, Exception]]:
        """``(task name, exception)`` for every background task that failed, from the
        app's startup on."""
        return self._failures.seen

    @property
    def nursery(self) -> BackgroundNursery:
        """The app's background nursery."""
        return self._watched_middleware().nursery

    @property
    def stats(self) -> TaskStats:
        """The background nursery's `TaskStats`."""
        return self._watched_middleware().nursery.stats

    @property
    def report(self) -> ShutdownReport:
        """The `ShutdownReport`, once the app has shut down."""
        return self._watched_middleware().report
