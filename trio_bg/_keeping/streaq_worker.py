"""streaq workers made for trio_bg (the implementation behind `trio_bg.streaq`): on
trio, JSON only, a task of an unknown name left queued, a record no sender wrote set
aside, and a twin for the web process to send tasks with."""

from __future__ import annotations

import contextvars
import inspect
import json
import logging
import pickle
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import trio
from coredis.response.types import StreamEntry
from streaq import Worker
from streaq import task as streaq_task
from streaq.constants import REDIS_GROUP
from streaq.types import Entries, StreamMessage, StreaqError, StreaqRetry

from .._engine.events import Outcome
from .._engine.recorder import TaskRecorder
from .._engine.tasks import remote_progress
from .remote_progress import ProgressWriter

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
    that does (logged at ERROR each time it comes back), never dropped. A record no
    sender wrote (not JSON, or not a task's shape: planted or corrupted in Redis) is
    set aside: acknowledged, its result stored as failed ("malformed task record:
    ..."), logged at ERROR without its data and counted as ``malformed``; the worker
    goes on.
    """
    for name in _FIXED:
        if name in options:
            raise TypeError(
                f"trio_bg.streaq.worker() sets {name} itself: trio_bg's workers run on "
                f"trio and keep tasks as JSON"
            )
    made = TrioWorker(
        redis_url,
        idle_timeout=idle_timeout,
        grace_period=grace_period,
        anyio_backend="trio",
        serializer=_dumps,
        deserializer=json.loads,
        **options,
    )
    made.middleware(_traced)
    made.middleware(_reporting_progress(made))
    made.middleware(_recording(made))
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
    if not isinstance(worker, TrioWorker):
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


def _reporting_progress(
    made: Worker[Any],
) -> Callable[[Callable[..., Coroutine[Any, Any, Any]]], Callable[..., Coroutine[Any, Any, Any]]]:
    """streaq middleware: `trio_bg.set_progress` in a task writes to Redis, where the
    web processes read it with the task's status."""

    def middleware(
        run: Callable[..., Coroutine[Any, Any, Any]],
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def reporting(*args: Any, **kwargs: Any) -> Any:
            task_id = streaq_task._task_context.get().task_id
            remote_progress.set(ProgressWriter(made, task_id))
            return await run(*args, **kwargs)

        return reporting

    return middleware


def _recording(
    made: TrioWorker,
) -> Callable[[Callable[..., Coroutine[Any, Any, Any]]], Callable[..., Coroutine[Any, Any, Any]]]:
    """streaq middleware: once the worker has a recorder (``worker --metrics``), each
    task's wait since it was enqueued, its run time and its outcome are recorded, and
    the tasks running counted."""

    def middleware(
        run: Callable[..., Coroutine[Any, Any, Any]],
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def recording(*args: Any, **kwargs: Any) -> Any:
            recorder = made.recorder
            if recorder is None:
                return await run(*args, **kwargs)
            context = streaq_task._task_context.get()
            enqueued = _enqueued.get()
            recorder.started(
                context.fn_name, None if enqueued is None else time.time() - enqueued / 1000
            )
            outcome: Outcome | None = "failed"
            made.tasks_running += 1
            deadline = trio.current_effective_deadline()  # (streaq's timeout scope is ours)
            began = trio.current_time()
            try:
                result = await run(*args, **kwargs)
                outcome = "completed"
                return result
            except StreaqRetry:
                outcome = None  # an attempt, not the task's end: streaq runs it again
                raise
            except BaseException as error:
                if _cancelled(error):  # streaq's timeout; else an abort, or its shutdown
                    outcome = "timed_out" if trio.current_time() >= deadline else "cancelled"
                raise
            finally:
                made.tasks_running -= 1
                if outcome is not None:
                    recorder.finished(context.fn_name, outcome, trio.current_time() - began)

        return recording

    return middleware


def _cancelled(error: BaseException) -> bool:
    """Whether ``error`` is trio's Cancelled, or a group of nothing else (a task's own
    nursery raises one so)."""
    if isinstance(error, BaseExceptionGroup):
        rest = error.split(trio.Cancelled)[1]
        return rest is None
    return isinstance(error, trio.Cancelled)


# When the task being read was enqueued (ms since the epoch, its record's "t").
_enqueued: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "trio_bg.streaq.enqueued", default=None
)

# The task whose record its run reads (None: none, or read already).
_reading: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trio_bg.streaq.reading", default=None
)

_FIELDS = (
    ("f", str, "a string"),
    ("a", list, "an array"),
    ("k", dict, "an object"),
    ("t", int, "an integer"),
)
"""What streaq's worker reads from every task's record, and its type."""

_UNFOLLOWED = (
    "streaq cannot read the data it leads to (a previous task's result), or store its result"
)

_LINKS = ("A", "F", "O", "T")
"""What streaq's worker reads from some task records: other tasks' ids."""


def _record_problem(record: object) -> str | None:
    """Why ``record`` is not a task's record as streaq's worker reads it (None: it is).
    Names keys and JSON types, never values: those are the task's data."""
    if not isinstance(record, dict):
        return f"a JSON {_json_type(record)}, not an object"
    for key, kind, name in _FIELDS:
        if key not in record:
            return f"no {key!r}"
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            return f"{key!r} is a JSON {_json_type(record[key])}, not {name}"
    for key in _LINKS:
        if key in record and not isinstance(record[key], str):
            return f"{key!r} is a JSON {_json_type(record[key])}, not a string"
    ours = record.get("trio_bg", {})
    if not isinstance(ours, dict):
        return f"'trio_bg' is a JSON {_json_type(ours)}, not an object"
    trace = ours.get("trace", {})
    if not isinstance(trace, dict) or not all(isinstance(v, str) for v in trace.values()):
        return "'trio_bg'.'trace' is not an object of strings"
    return None


def _is_task_entry(entry: StreamEntry) -> bool:
    fields = entry.field_values
    return "task_id" in fields and str(fields.get("enqueue_time", 0)).isdigit()


def _json_type(value: object) -> str:
    for kind, name in _JSON_TYPES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


_JSON_TYPES = (
    (bool, "boolean"),  # (before int: a bool is an int)
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
    (type(None), "null"),
)


class TrioWorker(Worker[Any]):
    """streaq's worker, but a task of a name it does not know stays in the queue; and
    it can make its twin for a web process to send tasks with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._arguments = args, kwargs
        # What ``python -m trio_bg worker --metrics`` shows: None until it asks.
        self.recorder: TaskRecorder | None = None
        self.tasks_running = 0

    async def run_task(self, msg: StreamMessage) -> None:
        token = _reading.set(msg.task_id)
        try:
            await super().run_task(msg)
        except StreaqError:
            # streaq handles a record it cannot read, not the data a record leads it to
            # (a pipelined task's previous result, gone) nor a result it cannot store.
            error = self._set_aside(msg.task_id, None, _UNFOLLOWED)
            await self.finish_failed_task(msg, error, 0, 0)
        finally:
            _reading.reset(token)

    async def deserialize(self, data: Any) -> Any:
        task_id = _reading.get()
        if task_id is None:
            return await super().deserialize(data)
        _reading.set(None)  # streaq reads the task's record first, then others' data
        try:
            record = await super().deserialize(data)
        except StreaqError:
            raise self._set_aside(task_id, None, "not JSON") from None
        problem = _record_problem(record)
        if problem is not None:
            raise self._set_aside(task_id, record, problem)
        _trace_carrier.set(record.get("trio_bg", {}).get("trace"))
        _enqueued.set(record["t"])
        return record

    async def _read_streams_legacy(self, count: int, block: bool = False) -> Entries:
        return await self._set_aside_entries(await super()._read_streams_legacy(count, block))

    async def _read_streams_max_count(self, count: int, block: bool = False) -> Entries:
        return await self._set_aside_entries(await super()._read_streams_max_count(count, block))

    async def _set_aside_entries(self, entries: Entries) -> Entries:
        """``entries`` but those naming no task, which streaq's producer cannot read
        (it would fail, and the worker with it): those are acknowledged and deleted,
        counted and logged."""
        if not entries:
            return entries
        bad = {
            stream: [entry.identifier for entry in read if not _is_task_entry(entry)]
            for stream, read in entries.items()
        }
        if not any(bad.values()):
            return entries
        async with self.redis.pipeline(transaction=True) as pipe:
            for stream, identifiers in bad.items():
                if identifiers:
                    pipe.xack(stream, REDIS_GROUP, identifiers)
                    pipe.xdel(stream, identifiers)
        for stream, identifiers in bad.items():
            for identifier in identifiers:
                self.counters["malformed"] += 1
                logger.error(
                    "streaq worker %s set aside stream entry %s of %s: it names no task (a "
                    "task_id, an integer enqueue_time); deleted",
                    self.id,
                    identifier,
                    stream,
                )
        good = {stream: tuple(filter(_is_task_entry, read)) for stream, read in entries.items()}
        return {stream: read for stream, read in good.items() if read}

    def _set_aside(self, task_id: str, record: object, problem: str) -> StreaqError:
        """Count and log a task whose record no sender of ours wrote; the error its
        result records (streaq acknowledges the task and stores it as failed)."""
        self.counters["malformed"] += 1
        name = record.get("f") if isinstance(record, dict) else None
        logger.error(
            "streaq worker %s set aside task %s%s: malformed task record: %s; recorded as failed",
            self.id,
            task_id,
            f" ({name})" if isinstance(name, str) else "",
            problem,
        )
        return StreaqError(f"malformed task record: {problem}")

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


def sender_of(worker: TrioWorker) -> Worker[Any]:
    """A worker like ``worker`` (same Redis, queue and format, same tasks) with a
    connection of its own: a web process sends with it, while ``worker`` may run tasks
    in the same process (a streaq worker is entered once at a time)."""
    args, kwargs = worker._arguments
    twin = Worker(*args, **kwargs)
    twin.registry = worker.registry
    return twin
