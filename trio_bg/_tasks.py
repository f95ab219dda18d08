"""What a background task is, how a request collects them, and where they go next."""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar, final, overload

from ._errors import NurseryClosed

P = ParamSpec("P")


@final
class Task:
    """One unit of background work: a checked call, the name it reports under, its
    timeout, and the context (a copy of the caller's) it will run in."""

    __slots__ = (
        "accepted_at",
        "args",
        "context",
        "func",
        "is_async",
        "kwargs",
        "name",
        "thread_started",
        "timeout",
    )

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.is_async = _check_call(func, args, kwargs)
        self.func = func
        self.args = args
        self.kwargs = kwargs
        options = _options_of(func)
        self.name = options.name if options and options.name else _name_of(func)
        self.timeout = options.timeout if options else None
        self.context = contextvars.copy_context()
        self.accepted_at = 0.0  # set by the nursery when it accepts the task
        # Set by the worker thread as it calls `func`: a cancelled thread task that
        # had started is "abandoned", one still waiting for a thread is "cancelled".
        self.thread_started = False

    def __repr__(self) -> str:
        # Never show the arguments: they may hold personal data.
        return f"<trio_bg task {self.name}>"


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What `task` attaches to a function."""

    name: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not (isinstance(self.name, str) and self.name):
            raise TypeError(f"a task name must be a non-empty str, not {self.name!r}")
        timeout = self.timeout
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(f"timeout must be finite and > 0, not {timeout!r}")


_OPTIONS_ATTRIBUTE = "__trio_bg_task__"
F = TypeVar("F", bound=Callable[..., Any])


@overload
def task(func: F, /) -> F: ...
@overload
def task(*, name: str | None = None, timeout: float | None = None) -> Callable[[F], F]: ...
def task(
    func: F | None = None, /, *, name: str | None = None, timeout: float | None = None
) -> F | Callable[[F], F]:
    """Give a task function a stable ``name`` and a ``timeout`` (seconds).

    Use it bare (``@trio_bg.task``) or with options (``@trio_bg.task(timeout=30)``).
    The function itself is returned unchanged, so it can still be called directly.
    A task that outlives its timeout is cancelled (a thread task is abandoned) and
    counted as ``timed_out``.
    """
    options = TaskOptions(name=name, timeout=timeout)

    def attach(func: F) -> F:
        if not callable(func):
            raise TypeError(f"@trio_bg.task decorates a function, not {func!r}")
        setattr(func, _OPTIONS_ATTRIBUTE, options)
        return func

    return attach if func is None else attach(func)


class TaskSink(Protocol):
    """Where accepted tasks go: today the in-process `BackgroundNursery`.

    This is the one seam between collecting tasks and running them; a durable
    journal or a hand-off to a distributed task engine plugs in here.
    """

    def admit(self, task: Task) -> None:
        """Reserve room for ``task``, or raise `Overloaded` if there is none now.
        May be called from a worker thread."""

    def accept(self, tasks: Sequence[Task]) -> None:
        """Take ``tasks`` for running; from here on each is reported. Raise
        `NurseryClosed`, having taken none, once shutdown has begun."""

    def discard(self, tasks: Sequence[Task], reason: str) -> None:
        """Release the room of ``tasks`` that were admitted but will never run, and
        count and log them."""


class BackgroundTasks:
    """The background tasks of one request or WebSocket session.

    `BackgroundTaskMiddleware` makes one per request (get it with `current_tasks`)
    and hands the collected tasks to the server's nursery once the response has
    completed. A task added after that hand-off goes to the nursery at once.
    """

    __slots__ = ("_handed_off", "_sink", "_tasks")

    def __init__(self, sink: TaskSink) -> None:
        self._sink = sink
        self._tasks: list[Task] = []
        self._handed_off = False

    def add_task(self, func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``func(*args, **kwargs)`` in the background once the response is sent.

        ``func`` may be an ``async def`` function (run as a trio task) or a plain one
        (run in a worker thread). A call that could never run -- a coroutine object,
        a non-callable, arguments that do not fit ``func`` -- raises `TypeError` here;
        a nursery that cannot take more work raises `Overloaded` (`NurseryClosed`
        once it is shutting down).
        """
        task = Task(func, args, kwargs)
        self._sink.admit(task)
        if self._handed_off:
            self._sink.accept((task,))
        else:
            self._tasks.append(task)

    async def __call__(self) -> None:
        """Hand the collected tasks to the nursery now, without running them here.

        This makes a `BackgroundTasks` usable where a framework expects a response's
        ``background`` callable (Starlette's ``Response(background=...)``): called
        after the body was sent, it passes the tasks on instead of running them inline.
        """
        self._hand_off()

    def __len__(self) -> int:
        """The number of tasks collected and not yet handed off."""
        return len(self._tasks)

    def __repr__(self) -> str:
        state = "handed off" if self._handed_off else f"{len(self._tasks)} collected"
        return f"<trio_bg.BackgroundTasks {state}>"

    def _hand_off(self) -> None:
        """The response completed: pass the collected tasks on to the sink."""
        self._handed_off = True
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        try:
            self._sink.accept(tasks)
        except NurseryClosed:
            self._sink.discard(tasks, "the background nursery had already shut down")

    def _discard(self, reason: str) -> None:
        """The response did not complete: the collected tasks will never run."""
        tasks, self._tasks = self._tasks, []
        if tasks:
            self._sink.discard(tasks, reason)


_current_tasks: contextvars.ContextVar[BackgroundTasks] = contextvars.ContextVar(
    "trio_bg.current_tasks"
)


def current_tasks() -> BackgroundTasks:
    """The `BackgroundTasks` of the request being handled.

    Works in ``async def`` handlers, in plain handlers that a framework runs in a
    worker thread, and in tasks those handlers start. Raises `RuntimeError` outside
    a request served through `BackgroundTaskMiddleware`.
    """
    try:
        return _current_tasks.get()
    except LookupError:
        raise RuntimeError(
            "trio_bg.current_tasks() was called outside a request: wrap the ASGI app in "
            "trio_bg.BackgroundTaskMiddleware and call it while handling a request "
            "(or use BackgroundNursery.start_soon outside requests)"
        ) from None


def _check_call(func: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Raise `TypeError` unless ``func(*args, **kwargs)`` can run; return whether
    it is async."""
    if inspect.isawaitable(func):
        name = getattr(func, "__qualname__", type(func).__name__)
        if inspect.iscoroutine(func):
            func.close()  # spare the user a second, confusing "never awaited" warning
        raise TypeError(
            f"add_task() takes a function and its arguments, not an awaitable: "
            f"write add_task({name}, ...) instead of add_task({name}(...))"
        )
    if not callable(func):
        raise TypeError(
            f"add_task() takes a callable (an async def or a plain function), "
            f"not {type(func).__name__} {func!r}"
        )
    target = _unwrap_partial(func)
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        raise TypeError(
            f"{_name_of(func)} is a generator function: calling it runs none of its body; "
            f"pass an async def or a plain function"
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have no signature to check against
        pass
    else:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"add_task({_name_of(func)}, ...): {error}") from None
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 -- an object with async __call__
    )


def _options_of(func: object) -> TaskOptions | None:
    """The `task` options of ``func``, or of the function a partial wraps."""
    while True:
        options: TaskOptions | None = getattr(func, _OPTIONS_ATTRIBUTE, None)
        if options is not None or not isinstance(func, functools.partial):
            return options
        func = func.func


def _unwrap_partial(func: object) -> object:
    while isinstance(func, functools.partial):
        func = func.func
    return func


def _name_of(func: object) -> str:
    target = _unwrap_partial(func)
    name = getattr(target, "__qualname__", None)
    return name if isinstance(name, str) else type(target).__qualname__
