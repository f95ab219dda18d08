"""The request side's collection of tasks: `BackgroundTasks` (one per request, handed
to the nursery once the response has completed), `current_tasks`, and `TaskSink`, the
one seam between collecting tasks and running them."""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, Protocol

from .._engine.tasks import Task, TaskEnds
from .._errors import NurseryClosed, needs_a_handoff, needs_a_journal
from .inline import InlineSink, run_inline

P = ParamSpec("P")

logger = logging.getLogger("trio_bg")


class TaskSink(Protocol):
    """Where accepted tasks go: the in-process `BackgroundNursery`.

    This is the one seam between collecting tasks and running them: the nursery
    keeps durable tasks in its journal (`commit`) before it runs them, and hands
    remote tasks to their streaq worker's queue in Redis (`commit` too).
    """

    def admit(self, task: Task) -> None:
        """Reserve room for ``task``, or raise `Overloaded` if there is none now.
        May be called from a worker thread."""

    def accept(self, tasks: Sequence[Task]) -> None:
        """Take ``tasks`` for running; from here on each is reported. Raise
        `NurseryClosed`, having taken none, once shutdown has begun. May be called
        from a worker thread."""

    def discard(self, tasks: Sequence[Task], reason: str) -> None:
        """Release the room of ``tasks`` that were admitted but will never run, and
        count and log them (removing the journaled ones from the journal). May be
        called from a worker thread."""

    async def commit(self, tasks: Sequence[Task]) -> None:
        """Store the durable ones of ``tasks`` in the journal, and hand the remote ones
        to Redis, before the response completes; `JournalError` or `HandoffError` if
        that fails. Called in trio's thread."""


class BackgroundTasks:
    """The background tasks of one request or WebSocket session.

    `BackgroundTaskMiddleware` makes one per request (`current_tasks` returns it) and
    hands the collected tasks to the server's nursery once the response has
    completed; a task added after that goes to the nursery at once. A request's tasks
    run concurrently, or, with `ordered`, one after another in the order added.

    ``BackgroundTasks()`` also works as Starlette's does, so that changing the import
    is enough: made during a request served through the middleware, it *is* that
    request's collection (passed as a response's ``background`` or not); made where
    the middleware serves no request, its tasks run inline, one after another, when it
    is awaited as a response's ``background``, exactly as Starlette's would.
    """

    __slots__ = (
        "_adds_to",
        "_discarded_because",
        "_handed_off",
        "_lock",
        "_ordered",
        "_sink",
        "_stop_on_failure",
        "_tasks",
        "_uncommitted",
    )

    def __init__(self, tasks: Iterable[Any] | None = None) -> None:
        """The current request's tasks, or a collection of its own outside requests.
        ``tasks``: Starlette ``BackgroundTask`` objects (``func``, ``args``,
        ``kwargs``) to add, as Starlette's ``BackgroundTasks(tasks=...)`` takes."""
        request = current_collection.get(None)
        self._adds_to: BackgroundTasks | None
        if request is None:
            self._start(None, ordered=False)
        else:
            self._adds_to = request
        for task in tasks or ():
            self.add_task(task.func, *task.args, **task.kwargs)

    @classmethod
    def _of_request(
        cls, sink: TaskSink, *, ordered: bool, stop_on_failure: bool = False
    ) -> BackgroundTasks:
        """A request's collection, feeding ``sink`` (the middleware's way in)."""
        tasks = cls.__new__(cls)
        tasks._start(sink, ordered=ordered or stop_on_failure)
        tasks._stop_on_failure = stop_on_failure
        return tasks

    def _start(self, sink: TaskSink | None, *, ordered: bool) -> None:
        self._adds_to = None  # those made later in the request add to this one
        self._sink = sink  # None: no middleware; run inline when awaited
        self._tasks: list[Task] = []
        # How many of them must be kept before the response completes and are not yet:
        # durable tasks (stored in the journal) and remote ones (handed to Redis).
        self._uncommitted = 0
        self._handed_off = False
        self._discarded_because: str | None = None
        self._ordered = ordered
        self._stop_on_failure = False
        # add_task may run in a worker thread (a sync handler, or a thread it left
        # behind) while trio's thread hands the tasks off or discards them.
        self._lock = threading.Lock()

    @property
    def _owner(self) -> BackgroundTasks:
        """The collection that holds this one's tasks: the request's own. (It never
        refers to itself: that cycle made every request's collection garbage that only
        the cyclic GC could free.)"""
        return self if self._adds_to is None else self._adds_to

    def add_task(self, func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``func(*args, **kwargs)`` in the background once the response is sent.

        ``func`` may be an ``async def`` function (run as a trio task) or a plain one
        (run in a worker thread). A call that could never run -- a coroutine object,
        a non-callable, arguments that do not fit ``func`` -- raises `TypeError` here;
        a nursery that cannot take more work raises `Overloaded` (`NurseryClosed`
        once it is shutting down).
        """
        self._owner._take(Task(func, args, kwargs))

    @property
    def ordered(self) -> bool:
        """Whether this request's tasks run one after another, in the order they were
        added (each still after the response, in the nursery, a failure not stopping
        the next), rather than concurrently. Set it before the response completes;
        tasks added after that run as soon as they are added."""
        return self._owner._ordered

    @ordered.setter
    def ordered(self, ordered: bool) -> None:
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, not {ordered!r}")
        self._owner._ordered = ordered

    @property
    def stop_on_failure(self) -> bool:
        """Whether, `ordered`, a task that fails (or times out) skips the tasks after it,
        as Starlette's do: they never run, and are counted as cancelled. Setting it
        sets `ordered` too."""
        return self._owner._stop_on_failure

    @stop_on_failure.setter
    def stop_on_failure(self, stop: bool) -> None:
        if not isinstance(stop, bool):
            raise TypeError(f"stop_on_failure must be True or False, not {stop!r}")
        owner = self._owner
        owner._stop_on_failure = stop
        owner._ordered = owner._ordered or stop

    async def __call__(self) -> None:
        """Hand the collected tasks to the nursery now, without running them here.

        This makes a `BackgroundTasks` usable where a framework expects a response's
        ``background`` callable (Starlette's ``Response(background=...)``): called
        after the body was sent, it passes the tasks on instead of running them inline.
        Outside the middleware, it runs them inline, as Starlette's would.
        """
        owner = self._owner
        if owner._sink is not None:
            owner._hand_off()
            return
        with owner._lock:
            tasks, owner._tasks = owner._tasks, []
        if (request := current_collection.get(None)) is not None:
            for task in tasks:  # made outside the request, awaited in one: it takes them
                request._take(task)
            return
        logger.debug("no BackgroundTaskMiddleware: running %d task(s) inline", len(tasks))
        await run_inline(tasks)

    def _add_counted(
        self,
        ends: TaskEnds,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """`add_task`, the task counted by ``ends`` until it has ended."""
        task = Task(func, args, kwargs)
        ends.add(task)  # first: a task may end as it is taken (past the grace period)
        try:
            self._owner._take(task)
        except BaseException:
            ends.forget(task)
            raise

    async def _until_ended(self, ends: TaskEnds) -> None:
        """Return once the tasks counted by ``ends`` have ended; without a nursery (the
        tasks would run once the request's call is over), run them here, now."""
        sink = self._owner._sink
        if isinstance(sink, InlineSink):
            await sink.run()
        else:
            await ends.wait()

    def __len__(self) -> int:
        """The number of tasks collected and not yet handed off."""
        return len(self._owner._tasks)

    def __repr__(self) -> str:
        owner = self._owner
        state = "handed off" if owner._handed_off else f"{len(owner._tasks)} collected"
        return f"<trio_bg.BackgroundTasks {state}>"

    def _take(self, task: Task) -> None:
        """Collect ``task``, or pass it on if the response completed already."""
        sink = self._sink
        if sink is None:  # no middleware: run inline when awaited
            if task.durable:
                raise needs_a_journal(task.name, "no BackgroundTaskMiddleware serves this request")
            if task.remote is not None:
                raise needs_a_handoff(task.name, "no BackgroundTaskMiddleware serves this request")
            with self._lock:
                self._tasks.append(task)
            return
        sink.admit(task)
        task.context = contextvars.copy_context()
        with self._lock:
            discarded_because = self._discarded_because
            if not self._handed_off and discarded_because is None:
                self._tasks.append(task)
                self._uncommitted += task.durable or task.remote is not None
                return
        # Too late to collect it (the sink hops to trio's thread if need be).
        if discarded_because is None:
            self._pass_on([task])
        else:  # the request failed already
            sink.discard((task,), discarded_because)

    @property
    def _settled(self) -> bool:
        """Whether the collected tasks were handed off or discarded already."""
        return self._handed_off or self._discarded_because is not None

    async def _commit(self) -> None:
        """Store the collected durable tasks in the journal and hand the remote ones to
        Redis (`JournalError`, `HandoffError` if that fails): the response may complete
        once this returns."""
        assert self._sink is not None
        with self._lock:
            tasks = list(self._tasks)
            self._uncommitted = 0  # (those added from now on are kept next time)
        await self._sink.commit(tasks)

    def _hand_off(self) -> None:
        """The response completed: pass the collected tasks on to the sink."""
        with self._lock:
            self._handed_off = True
            tasks, self._tasks = self._tasks, []
        if tasks:
            self._pass_on(tasks)

    def _pass_on(self, tasks: list[Task]) -> None:
        assert self._sink is not None
        heads = tasks
        if self._ordered and len(tasks) > 1:
            # Remote tasks run elsewhere, so only the tasks run here take turns.
            local = [task for task in tasks if task.remote is None]
            for task, successor in itertools.pairwise(local):
                task.then = successor  # the sink starts it once ``task`` has ended
                task.stops_chain = self._stop_on_failure
            heads = [task for task in tasks if task.remote is not None] + local[:1]
        try:
            self._sink.accept(heads)
        except NurseryClosed:
            self._sink.discard(tasks, "the background nursery had already shut down")

    def _discard(self, reason: str) -> None:
        """The response did not complete: the collected tasks, and any added later,
        will never run."""
        with self._lock:
            self._discarded_because = reason
            tasks, self._tasks = self._tasks, []
        if tasks and self._sink is not None:
            self._sink.discard(tasks, reason)


current_collection: contextvars.ContextVar[BackgroundTasks] = contextvars.ContextVar(
    "trio_bg.current_tasks"
)


def current_tasks() -> BackgroundTasks:
    """The `BackgroundTasks` of the request being handled.

    Works in ``async def`` handlers, in plain handlers that a framework runs in a
    worker thread, and in tasks those handlers start. Raises `RuntimeError` outside
    a request served through `BackgroundTaskMiddleware`.
    """
    try:
        return current_collection.get()
    except LookupError:
        raise RuntimeError(
            "trio_bg.current_tasks() was called outside a request: wrap the ASGI app in "
            "trio_bg.BackgroundTaskMiddleware and call it while handling a request "
            "(or use BackgroundNursery.start_soon outside requests)"
        ) from None
