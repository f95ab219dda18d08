"""What a background task is: its checked call, its options, where it is kept (a
journal row, a remote hand-off), and who waits for its end."""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

import trio

from .calls import spec_of
from .durable import encode_arguments, encode_parts
from .status import TaskState, keyed_id, new_id

if TYPE_CHECKING:
    from .._keeping.redis_guard import Receipt


@final
class Task:
    """One unit of background work: a checked call, the name it reports under, its
    timeout and retries, and the context (a copy of the caller's) it will run in."""

    __slots__ = (
        "accepted_at",
        "args",
        "attempt",
        "backoff",
        "cancel_requested",
        "context",
        "created",
        "duplicate",
        "durable",
        "ends",
        "func",
        "home",
        "id",
        "is_async",
        "journal_id",
        "key_ttl",
        "keyed",
        "kwargs",
        "message",
        "name",
        "payload",
        "progress",
        "remote",
        "result",
        "retries",
        "revoked",
        "scope",
        "started",
        "started_at",
        "state",
        "stops_chain",
        "then",
        "thread_started",
        "timeout",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        payload: str | None = None,
        id: str | None = None,
        created: float | None = None,
    ):
        """Check the call; ``payload``, ``id`` and ``created``: those of a durable task
        replayed from the journal (else a durable task's arguments are encoded here,
        and the id is made: random, or derived from the call's deduplication key)."""
        spec = spec_of(func)
        spec.check(args, kwargs)
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.is_async = spec.is_async
        self.name = spec.name
        self.timeout = spec.timeout
        self.retries = spec.retries
        self.backoff = spec.backoff
        self.durable = spec.durable
        # A durable task's JSON arguments (checked now: a TypeError in the handler), and
        # its row in the journal once stored.
        self.payload = payload
        if spec.durable and payload is None:
            self.payload = encode_arguments(spec.name, args, kwargs)
        self.journal_id: int | None = None
        self.duplicate = False  # the journal has a queued row with its id: not stored
        # A streaq task (run by a worker, elsewhere): its arguments checked as JSON now.
        self.remote: RemoteCall | None = None
        if spec.remote is not None:
            arguments, keywords = encode_parts(spec.name, args, kwargs, kind="remote task")
            if payload is None:
                self.payload = f"[{arguments},{keywords}]"
            record = f'{{"f":{json.dumps(spec.name)},"a":{arguments},"k":{keywords}'
            self.remote = RemoteCall(spec.remote, record)
        self.keyed = spec.key is not None
        if id is None:
            id = new_id() if spec.key is None else keyed_id(spec.name, spec.key(args, kwargs))
        self.id = id
        self.key_ttl = spec.key_ttl
        # What a status shows: wall-clock times (time.time()), the state while it
        # lives, its own progress, and its return value as JSON text.
        self.created = time.time() if created is None else created
        self.started: float | None = None
        self.state: TaskState = "pending"
        self.progress: float | None = None
        self.message: str | None = None
        self.result: str | None = None
        # cancel_task's: the scope a running async attempt (or a backoff) runs in, and
        # whether it was asked to cancel the task (then it never runs again).
        self.scope: trio.CancelScope | None = None
        self.cancel_requested = False
        # Its journal row went to another process (its lease lapsed): never run it again.
        self.revoked = False
        self.home: object = None  # the nursery's runner, once it accepted the task
        self.attempt = 1  # which run this is: 2 once a first retry is due
        # The caller's context, copied when the task is deferred (collected by a
        # request, or queued); None while it may still be spawned from the caller. A
        # task that may run again keeps it from the start: each attempt starts afresh
        # from the caller's context, not from what an earlier attempt left in it.
        self.context: contextvars.Context | None = (
            contextvars.copy_context() if spec.retries else None
        )
        self.accepted_at: float | None = None  # set when queued, or when events are observed
        self.started_at: float | None = None  # set when events are observed
        self.ends: TaskEnds | None = None  # told when it ends, if someone waits for that
        self.then: Task | None = None  # the next of an ordered request's tasks
        self.stops_chain = False  # if it fails, ``then`` and those after it never run
        # A cancelled thread task that had started is "abandoned"; one that had not is
        # "cancelled", and never runs (see BackgroundNursery._cancel_rest).
        self.thread_started = False

    def __repr__(self) -> str:
        # Never show the arguments: they may hold personal data.
        return f"<trio_bg task {self.name} {self.id}>"


running_task: contextvars.ContextVar[Task] = contextvars.ContextVar("trio_bg.running_task")
"""The task whose attempt runs in this context (set in the attempt's own context)."""

remote_progress: contextvars.ContextVar[Callable[[float | None, str | None], object]] = (
    contextvars.ContextVar("trio_bg.remote_progress")
)
"""In a remote task run by a streaq worker for trio_bg: where its progress goes."""


@final
class TaskEnds:
    """Counts some tasks of a request until each has ended (run to any outcome,
    handed off, or discarded), so that someone can wait for them all: FastAPI keeps a
    request's dependencies open until its background tasks have run."""

    __slots__ = ("_all_ended", "_left", "_lock")

    def __init__(self) -> None:
        self._left = 0
        self._all_ended = trio.Event()
        self._lock = threading.Lock()  # tasks are added in worker threads too

    def add(self, task: Task) -> None:
        """Count ``task`` until it ends (it calls `ended`)."""
        with self._lock:
            if not self._left and self._all_ended.is_set():
                self._all_ended = trio.Event()
            self._left += 1
        task.ends = self

    def forget(self, task: Task) -> None:
        """Stop counting ``task``: it was refused, and never ends."""
        task.ends = None
        with self._lock:
            self._left -= 1

    def ended(self) -> None:
        """One of the tasks ended (in trio's thread)."""
        with self._lock:
            self._left -= 1
            last = not self._left
        if last:
            self._all_ended.set()

    async def wait(self) -> None:
        """Return once every task counted so far has ended."""
        if self._left:
            await self._all_ended.wait()
        else:
            await trio.lowlevel.checkpoint()


@final
class RemoteCall:
    """What a remote task takes to its streaq worker's queue: the streaq task, the
    JSON record the worker reads (made of the arguments checked at ``add_task``; the
    time goes last), the trace context, whether Redis has it (``sent``, and where:
    ``receipt``), or may have it (``in_doubt``: it did not answer)."""

    __slots__ = ("in_doubt", "receipt", "record", "registered", "sent", "trace")

    def __init__(self, registered: Any, record: str) -> None:
        self.registered = registered
        self.record = record
        self.trace: dict[str, str] | None = None
        self.sent = False
        self.in_doubt = False
        self.receipt: Receipt | None = None


def sent(task: Task) -> bool:
    """Whether ``task`` is a remote task that Redis has acknowledged."""
    return task.remote is not None and task.remote.sent
