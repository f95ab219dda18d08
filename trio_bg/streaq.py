"""Hand tasks to streaq workers over Redis: the same ``add_task``, run on other machines.

Register tasks on a worker made by `worker` and give the worker to the nursery::

    import trio_bg, trio_bg.streaq

    tasks = trio_bg.streaq.worker("redis://redis.internal:6379")

    @tasks.task(name="emails.welcome")
    async def send_welcome(address: str) -> None: ...

    app = trio_bg.BackgroundTaskMiddleware(app, streaq=tasks)

A handler's ``current_tasks().add_task(send_welcome, "a@example.com")`` then sends the
task to Redis before the response's body goes out (a 503 if Redis cannot take it),
and ``python -m trio_bg worker myapp.tasks:tasks`` runs it, on trio. Every other task
still runs in the process's own nursery.

streaq's tasks run at least once: a worker that dies mid-task leaves it to another
worker, which runs it again. Make remote tasks idempotent (README, Remote tasks).
"""

from __future__ import annotations

import contextvars
import inspect
import json
import logging
import pickle
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from streaq import Worker
from streaq import task as streaq_task
from streaq.types import StreamMessage, StreaqError

__all__ = ["DEFAULT_GRACE_PERIOD", "DEFAULT_IDLE_TIMEOUT", "check_worker", "worker"]

logger = logging.getLogger("trio_bg")

DEFAULT_IDLE_TIMEOUT = 10
"""Seconds after which a task that a worker took and stopped renewing (the worker was
killed, or its host lost) is given to another worker. streaq's own default, 60 s,
would leave a killed worker's task waiting a minute; the renewal runs every 9 s."""

DEFAULT_GRACE_PERIOD = 10
"""Seconds a worker told to stop (SIGTERM, SIGINT) lets its running tasks finish before
it cancels them (they go back to the queue). streaq's own default, 0, cancels them at
once; 10 matches the web side's `trio_bg.DEFAULT_GRACE_PERIOD`."""

_FIXED = ("anyio_backend", "serializer", "deserializer")


def worker(
    redis_url: str = "redis://localhost:6379",
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    grace_period: int = DEFAULT_GRACE_PERIOD,
    **options: Any,
) -> Worker[Any]:
    """A streaq `Worker` set up for trio_bg: it runs on trio, keeps tasks as JSON (never
    pickle), and hands a killed worker's task to another within ``idle_timeout``.

    The web process and the worker processes import the same worker object: the web
    side sends its tasks, ``python -m trio_bg worker module:name`` runs them. The
    other ``options`` are streaq's own (``concurrency``, ``queue_name``, ...).
    A task whose name this worker does not know is left in the queue for a worker
    that does (logged at ERROR each time it comes back), never dropped.
    """
    for name in _FIXED:
        if name in options:
            raise TypeError(
                f"trio_bg.streaq.worker() sets {name} itself: trio_bg's workers run on "
                f"trio and keep tasks as JSON"
            )
    made = _Worker(
        redis_url,
        idle_timeout=idle_timeout,
        grace_period=grace_period,
        anyio_backend="trio",
        serializer=_dumps,
        deserializer=json.loads,
        **options,
    )
    made.middleware(_traced)
    return made


def check_worker(worker: object) -> None:
    """Raise `TypeError` unless ``worker`` was made by `worker` and still keeps its
    tasks as JSON. A worker that unpickles what it reads from Redis (streaq's
    default) runs the code of anyone who can write to that Redis: refused."""
    if not isinstance(worker, Worker):
        raise TypeError(
            f"expected a streaq Worker (made with trio_bg.streaq.worker()), not {worker!r}"
        )
    problem = _serialization_problem(worker)
    if problem is not None:
        raise TypeError(
            f"streaq worker {worker.queue_name!r} {problem}: trio_bg hands tasks only to "
            f"workers that keep them as JSON, since a worker that unpickles what it reads "
            f"from Redis runs the code of anyone who can write to that Redis. Make it "
            f"with trio_bg.streaq.worker(redis_url)"
        )
    if not isinstance(worker, _Worker):
        raise TypeError(
            f"streaq worker {worker.queue_name!r} was not made by trio_bg.streaq.worker(): "
            f"make it with that, so that the web process sends its tasks on a connection "
            f"of its own and workers keep tasks of names they do not know"
        )


def _serialization_problem(worker: Worker[Any]) -> str | None:
    probe = {"f": "trio_bg.probe", "a": [1, "two"], "k": {"three": None}, "t": 0}
    try:
        read = worker.deserializer(pickle.dumps(probe))
    except Exception:  # a JSON deserializer cannot read it: as it should be
        pass
    else:
        if inspect.iscoroutine(read):
            read.close()
            return "has an async deserializer; trio_bg needs a plain JSON one"
        return f"unpickles what it reads (it read a pickle as a {type(read).__name__})"
    try:
        text = worker.serializer(probe)
        if inspect.iscoroutine(text):
            text.close()
            return "has an async serializer; trio_bg needs a plain JSON one"
        if not isinstance(text, str | bytes):
            return "does not serialize tasks as JSON"
        same = json.loads(text) == probe and worker.deserializer(_as_bytes(text)) == probe
    except Exception:  # (whatever it raised: it does not keep tasks as JSON)
        same = False
    if not same:
        return "does not keep tasks as JSON"
    if worker.signing_secret is not None:
        return "signs its data, which streaq supports only for binary serializers"
    return None


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _dumps(data: Any) -> str:
    """JSON for streaq's records. Task data is JSON already (checked at ``add_task``);
    a result or an error that is not becomes text, so the worker can always store it."""
    return json.dumps(data, default=_as_json, separators=(",", ":"))


def _as_json(value: object) -> object:
    if isinstance(value, BaseException):
        return {"error": type(value).__qualname__, "message": str(value)}
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return repr(value)


# The trace context a task was handed off with (None: none), from its data in Redis to
# the middleware around its run: set as its consumer reads the data, in the same task.
_trace_carrier: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "trio_bg.streaq.trace_carrier", default=None
)


def _traced(
    run: Callable[..., Coroutine[Any, Any, Any]],
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """streaq middleware: with OpenTelemetry in use, a task that came with a trace
    context runs in a span of its own, a child of the request that added it."""

    async def traced(*args: Any, **kwargs: Any) -> Any:
        carrier = _trace_carrier.get()
        if carrier is None or "opentelemetry.trace" not in sys.modules:
            return await run(*args, **kwargs)
        from opentelemetry import propagate, trace

        name = streaq_task._task_context.get().fn_name
        with trace.get_tracer("trio_bg").start_as_current_span(
            f"remote task {name}",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.CONSUMER,
            attributes={"trio_bg.task.name": name},
        ):
            return await run(*args, **kwargs)

    return traced


class _Worker(Worker[Any]):
    """streaq's worker, but a task of a name it does not know stays in the queue; and
    it can make its twin for a web process to send tasks with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._arguments = args, kwargs

    async def deserialize(self, data: Any) -> Any:
        value = await super().deserialize(data)
        if isinstance(value, dict) and "a" in value:  # a task's data (not a result)
            _trace_carrier.set(value.get("trio_bg", {}).get("trace"))
        return value

    def _sender(self) -> Worker[Any]:
        """A worker like this one (same Redis, queue and format, same tasks) with a
        connection of its own: a web process sends with it, while this one may run
        tasks in the same process (a streaq worker is entered once at a time)."""
        args, kwargs = self._arguments
        twin = Worker(*args, **kwargs)
        twin.registry = self.registry
        return twin

    async def finish_failed_task(
        self,
        msg: StreamMessage,
        exc: BaseException,
        tries: int,
        created_time: int,
        fn_name: str = "Unknown",
        ttl: Any = 300,
        otherwise: str | None = None,
    ) -> None:
        if fn_name in self.registry or not (
            isinstance(exc, StreaqError) and str(exc).startswith("Missing function")
        ):
            await super().finish_failed_task(msg, exc, tries, created_time, fn_name, ttl, otherwise)
            return
        # Left unacknowledged, the message goes to another worker once idle_timeout
        # has passed (a newer deployment's, say), and this delivery is not a try.
        self.counters["unknown"] += 1
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.decr(self._retry_key + msg.task_id)
            pipe.srem(self._running_set, [msg.task_id])
        logger.error(
            "streaq worker %s does not know task %s (%s): left in the queue for a worker "
            "that does; offered again in %ss",
            self.id,
            fn_name,
            msg.task_id,
            self.idle_timeout / 1000,
        )
