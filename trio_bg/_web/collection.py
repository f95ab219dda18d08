"""The request side's collection of tasks: `BackgroundTasks` (one per request, handed
to the nursery once the response has completed), `current_tasks`, and `TaskSink`, the
one seam between collecting tasks and running them.

`BackgroundTasks` is the public face of a `RequestTasks`, what the rest of the package
works with (`collection_of`, `face_of`): the middleware commits, hands off and discards
a request's tasks through it."""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, Protocol

from .._engine.status import TaskHandle
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

    def admit(self, task: Task) -> TaskHandle | None:
        """Reserve room for ``task``, or raise `Overloaded` if there is none now; or
        return the handle of the live task that has ``task``'s id (then ``task`` is a
        duplicate, and nothing is taken). May be called from a worker thread."""

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

    # The public face of a `RequestTasks`, which holds the tasks and does the work.
    __slots__ = ("_collection",)

    def __init__(self, tasks: Iterable[Any] | None = None) -> None:
        """The current request's tasks, or a collection of its own outside requests.
        ``tasks``: Starlette ``BackgroundTask`` objects (``func``, ``args``,
        ``kwargs``) to add, as Starlette's ``BackgroundTasks(tasks=...)`` takes."""
        request = current_collection.get(None)
        self._collection: RequestTasks = (
            RequestTasks(None, ordered=False) if request is None else request._collection
        )
        for task in tasks or ():
            self.add_task(task.func, *task.args, **task.kwargs)

    def add_task(self, func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
        """Run ``func(*args, **kwargs)`` in the background once the response is sent,
        and return its `TaskHandle`.

        ``func`` may be an ``async def`` function (run as a trio task) or a plain one
        (run in a worker thread). A call that could never run -- a coroutine object,
        a non-callable, arguments that do not fit ``func`` -- raises `TypeError` here;
        a nursery that cannot take more work raises `Overloaded` (`NurseryClosed`
        once it is shutting down). A task whose deduplication key is held (see
        `task`) is not added: the handle is the holder's.
        """
        task = Task(func, args, kwargs)
        return self._collection.take(task) or TaskHandle(task.id, task.name)

    @property
    def ordered(self) -> bool:
        """Whether this request's tasks run one after another, in the order they were
        added (each still after the response, in the nursery, a failure not stopping
        the next), rather than concurrently. Set it before the response completes;
        tasks added after that run as soon as they are added."""
        return self._collection.ordered

    @ordered.setter
    def ordered(self, ordered: bool) -> None:
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, not {ordered!r}")
        self._collection.ordered = ordered

    @property
    def stop_on_failure(self) -> bool:
        """Whether, `ordered`, a task that fails (or times out) skips the tasks after it,
        as Starlette's do: they never run, and are counted as cancelled. Setting it
        sets `ordered` too."""
        return self._collection.stop_on_failure

    @stop_on_failure.setter
    def stop_on_failure(self, stop: bool) -> None:
        if not isinstance(stop, bool):
            raise TypeError(f"stop_on_failure must be True or False, not {stop!r}")
        collection = self._collection
        collection.stop_on_failure = stop
        collection.ordered = collection.ordered or stop

    async def __call__(self) -> None:
        """Hand the collected tasks to the nursery now, without running them here.

        This makes a `BackgroundTasks` usable where a framework expects a response's
        ``background`` callable (Starlette's ``Response(background=...)``): called
        after the body was sent, it passes the tasks on instead of running them inline.
        Outside the middleware, it runs them inline, as Starlette's would.
        """
        await self._collection.release()

    def __len__(self) -> int:
        """The number of tasks collected and not yet handed off."""
        return len(self._collection)

    def __repr__(self) -> str:
        collection = self._collection
        state = "handed off" if collection.handed_off else f"{len(collection)} collected"
        return f"<trio_bg.BackgroundTasks {state}>"


def face_of(collection: RequestTasks) -> BackgroundTasks:
    """A `BackgroundTasks` for ``collection`` (the middleware's way to make the one it
    publishes for a request)."""
    tasks = BackgroundTasks.__new__(BackgroundTasks)
    tasks._collection = collection
    return tasks


def collection_of(tasks: BackgroundTasks) -> RequestTasks:
    """The collection behind ``tasks``: the request's own, for one made in a request."""
    return tasks._collection


class RequestTasks:
    """The tasks of one request (or WebSocket session), behind its `BackgroundTasks`:
    collected until the response completes, then handed to the sink, or discarded.

    A `BackgroundTasks` made outside requests has one of its own with no sink: its
    tasks run inline when it is awaited. (A collection never refers to its
    `BackgroundTasks`: that cycle would leave every request's collection garbage that
    only the cyclic GC could free.)
    """

    __slots__ = (
        "_discarded_because",
        "_handed_off",
        "_lock",
        "_sink",
        "_tasks",
        "ordered",
        "stop_on_failure",
        "uncommitted",
    )

    def __init__(
        self, sink: TaskSink | None, *, ordered: bool, stop_on_failure: bool = False
    ) -> None:
        self._sink = sink  # None: no middleware; run inline when awaited
        self._tasks: list[Task] = []
        # How many of them must be kept before the response completes and are not yet:
        # durable tasks (stored in the journal) and remote ones (handed to Redis). Read
        # it; only this class changes it.
        self.uncommitted = 0
        self._handed_off = False
        self._discarded_because: str | None = None
        self.ordered = ordered or stop_on_failure
        self.stop_on_failure = stop_on_failure
        # add_task may run in a worker thread (a sync handler, or a thread it left
        # behind) while trio's thread hands the tasks off or discards them.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def sink(self) -> TaskSink | None:
        """Where the tasks go: the nursery (None: they run inline when awaited)."""
        return self._sink

    @property
    def handed_off(self) -> bool:
        """Whether the collected tasks were handed off (the response completed)."""
        return self._handed_off

    @property
    def settled(self) -> bool:
        """Whether the collected tasks were handed off or discarded already."""
        return self._handed_off or self._discarded_because is not None

    def take(self, task: Task) -> TaskHandle | None:
        """Collect ``task``, or pass it on if the response completed already; or, a
        duplicate, take nothing and return the holder's handle."""
        sink = self._sink
        if sink is None:  # no middleware: run inline when awaited
            if task.durable:
                raise needs_a_journal(task.name, "no BackgroundTaskMiddleware serves this request")
            if task.remote is not None:
                raise needs_a_handoff(task.name, "no BackgroundTaskMiddleware serves this request")
            with self._lock:
                self._tasks.append(task)
            return None
        duplicate = sink.admit(task)
        if duplicate is not None:
            return duplicate
        task.context = contextvars.copy_context()
        with self._lock:
            discarded_because = self._discarded_because
            if not self._handed_off and discarded_because is None:
                self._tasks.append(task)
                self.uncommitted += task.durable or task.remote is not None
                return None
        # Too late to collect it (the sink hops to trio's thread if need be).
        if discarded_because is None:
            self._pass_on([task])
        else:  # the request failed already
            sink.discard((task,), discarded_because)
        return None

    def add_counted(
        self,
        ends: TaskEnds,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """`BackgroundTasks.add_task`, the task counted by ``ends`` until it has ended."""
        task = Task(func, args, kwargs)
        ends.add(task)  # first: a task may end as it is taken (past the grace period)
        try:
            duplicate = self.take(task)
        except BaseException:
            ends.forget(task)
            raise
        if duplicate is not None:
            ends.forget(task)  # (nothing was added: nothing to wait for)

    async def until_ended(self, ends: TaskEnds) -> None:
        """Return once the tasks counted by ``ends`` have ended; without a nursery (the
        tasks would run once the request's call is over), run them here, now."""
        sink = self._sink
        if isinstance(sink, InlineSink):
            await sink.run()
        else:
            await ends.wait()

    async def release(self) -> None:
        """What awaiting the `BackgroundTasks` does: hand the collected tasks to the
        sink; without one, pass them to the current request's collection, or, outside
        requests, run them inline."""
        if self._sink is not None:
            self.hand_off()
            return
        with self._lock:
            tasks, self._tasks = self._tasks, []
        if (request := current_collection.get(None)) is not None:
            collection = request._collection
            for task in tasks:  # made outside the request, awaited in one: it takes them
                collection.take(task)
            return
        logger.debug("no BackgroundTaskMiddleware: running %d task(s) inline", len(tasks))
        await run_inline(tasks)

    async def commit(self) -> None:
        """Store the collected durable tasks in the journal and hand the remote ones to
        Redis (`JournalError`, `HandoffError` if that fails): the response may complete
        once this returns."""
        assert self._sink is not None
        with self._lock:
            tasks = list(self._tasks)
            self.uncommitted = 0  # (those added from now on are kept next time)
        await self._sink.commit(tasks)

    def hand_off(self) -> None:
        """The response completed: pass the collected tasks on to the sink."""
        with self._lock:
            self._handed_off = True
            tasks, self._tasks = self._tasks, []
        if tasks:
            self._pass_on(tasks)

    def _pass_on(self, tasks: list[Task]) -> None:
        assert self._sink is not None
        heads = tasks
        if self.ordered and len(tasks) > 1:
            # Remote tasks run elsewhere, so only the tasks run here take turns.
            local = [task for task in tasks if task.remote is None]
            for task, successor in itertools.pairwise(local):
                task.then = successor  # the sink starts it once ``task`` has ended
                task.stops_chain = self.stop_on_failure
            heads = [task for task in tasks if task.remote is not None] + local[:1]
        try:
            self._sink.accept(heads)
        except NurseryClosed:
            self._sink.discard(tasks, "the background nursery had already shut down")

    def discard(self, reason: str) -> None:
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
