"""The hand-off of remote tasks to a streaq worker's queue in Redis, in batches: every
task handed over while one batch is on its way goes in the next, one round trip."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import trio

from .._errors import HandoffError
from .redis_guard import Receipt

if TYPE_CHECKING:
    from streaq import Worker

    from .._engine.tasks import Task

logger = logging.getLogger("trio_bg")

SEND_TIMEOUT = 5.0
"""Seconds a batch may take to reach Redis before its tasks count as not handed off."""

MARKER_SUFFIX = ":trio_bg:marker"
"""After a streaq queue's prefix, the key of trio_bg's marker in Redis (see
`trio_bg._redis_guard`): a random token, without expiry."""

RETRY_FIRST = 0.1
RETRY_MAX = 5.0
"""Seconds between tries to reach Redis once it was lost (or, with a journal, while it
was never reached): the first wait, doubling up to the last."""


@final
class _Shipment:
    """Tasks gathered for one round trip, and the requests waiting on it."""

    __slots__ = ("done", "error", "tasks", "waiters")

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.waiters: list[trio.lowlevel.Task] = []
        self.done = False
        self.error: HandoffError | None = None

    def settle(self, error: HandoffError | None = None) -> None:
        """Done (``error``: not sent, or, `HandoffError.in_doubt`, perhaps sent): wake
        whoever waits on it, once."""
        if not self.done:
            self.done = True
            self.error = error
            if error is not None and error.in_doubt:
                for task in self.tasks:
                    assert task.remote is not None
                    task.remote.in_doubt = True
            for waiter in self.waiters:
                trio.lowlevel.reschedule(waiter)


def _not_now(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


PING_TIMEOUT = 1.0
"""Seconds `Handoff.reachable` waits for Redis's answer."""


class Handoff:
    """Sends remote tasks to their streaq worker's queue: `send` returns once Redis has
    them (`HandoffError` if it cannot take them). `run` holds the connection."""

    def __init__(self, worker: Worker[Any]) -> None:
        from .streaq_worker import TrioWorker, sender_of

        assert isinstance(worker, TrioWorker)  # (checked with the nursery's options)
        self.origin = worker  # the worker the nursery was given
        self.worker = sender_of(worker)  # the app's own worker may run in this process
        self._open: _Shipment | None = None  # the next batch, gathering tasks
        self._on_its_way: _Shipment | None = None
        self._wake = trio.Event()
        self._connected = False
        self._on_connect = trio.Event()
        self._closed = False
        self.marker = ""  # the token in trio_bg's marker when last seen (see _arm_marker)
        # Set when Redis may have lost its data (a new connection, streaq's functions
        # gone): whoever watches the receipts looks now.
        self.look_now = trio.Event()
        self._checked_persistence = False

    async def send(self, tasks: Sequence[Task]) -> None:
        """Hand ``tasks`` to Redis: return once it acknowledged them, or raise
        `HandoffError`. Not cancellable: a round trip is short (and bounded by
        `SEND_TIMEOUT`), and waiting it out keeps the books exact."""
        if self._closed:
            raise HandoffError("the hand-off to Redis has closed")
        if not self._connected:
            raise HandoffError(f"not connected to Redis for {self._describe_queue()}")
        shipment = self._open
        if shipment is None:
            shipment = self._open = _Shipment()
            self._wake.set()
        shipment.tasks.extend(tasks)
        # Not cancellable (cheaper than a shielded cancel scope, on every request).
        shipment.waiters.append(trio.lowlevel.current_task())
        await trio.lowlevel.wait_task_rescheduled(_not_now)
        if shipment.error is not None:
            raise shipment.error

    @property
    def connected(self) -> bool:
        """Whether the connection to Redis was up when last used."""
        return self._connected

    async def reachable(self) -> bool:
        """Whether Redis answers a ping within `PING_TIMEOUT` seconds now (an idle
        connection learns it was lost only when next used; the dashboard asks this)."""
        if not self._connected:
            await trio.lowlevel.checkpoint()
            return False
        with trio.move_on_after(PING_TIMEOUT):
            try:
                await self.worker.redis.ping()
            except Exception:  # any failure is an answer: not reachable
                return False
            return True
        return False

    async def wait_connected(self) -> None:
        """Return once connected to Redis (at once if it is)."""
        if not self._connected:
            await self._on_connect.wait()

    def close(self) -> None:
        """Stop once the batches handed over so far are delivered."""
        self._closed = True
        self._wake.set()

    async def run(self, *, patient: bool, task_status: trio.TaskStatus[Handoff]) -> None:
        """Connect, then send batches until `close`; a lost connection is made again.
        Not ``patient``, the first connection must succeed (else `HandoffError`);
        ``patient`` (a journal keeps the tasks meanwhile), it starts at once and
        connects when it can. Cancelled, the waiting requests hear that their tasks
        were not sent."""
        from .streaq_worker import sender_of

        started = patient
        if patient:
            task_status.started(self)
        delay = 0.0
        try:
            while not self._closed:
                try:
                    async with self.worker:
                        self.marker = await self._arm_marker()
                        if not self._checked_persistence:
                            self._checked_persistence = True
                            await self._warn_unless_persistent()
                        self._connected = True
                        self._on_connect.set()
                        if started:
                            self.look_now.set()
                        if not started:
                            started = True
                            task_status.started(self)
                        delay = 0.0
                        await self._ship()
                except Exception as error:  # (a group, from streaq's task groups)
                    problem = f"Redis for {self._describe_queue()}: {_describe(error)}"
                    if not started:
                        raise HandoffError(f"cannot reach {problem}") from None
                    if self._closed:  # (closing the connection failed: it is over anyway)
                        logger.warning("closing the connection to %s", problem)
                        return
                    self._connected = False
                    self._on_connect = trio.Event()
                    self._fail_waiting(f"lost {problem}")
                    delay = min(max(2 * delay, RETRY_FIRST), RETRY_MAX)
                    logger.error("lost or cannot reach %s; trying again in %.3gs", problem, delay)
                    await trio.sleep(delay)
                    self.worker = sender_of(self.origin)  # (a worker is entered only once)
        finally:
            self._closed = True
            self._fail_waiting("the hand-off to Redis was cancelled")

    def _fail_waiting(self, problem: str) -> None:
        """Tell whoever waits on a batch not delivered that its tasks were not sent,
        or, for the batch on its way, perhaps sent."""
        if self._on_its_way is not None:
            self._on_its_way.settle(HandoffError(_may_have_them(problem), in_doubt=True))
        if self._open is not None:
            self._open.settle(HandoffError(problem))
        self._on_its_way = self._open = None

    async def look(self) -> tuple[str, str | None]:
        """The token in trio_bg's marker now (set anew if Redis lost it), and the last
        entry of the queue's stream that streaq's workers have taken (None: none)."""
        from streaq.constants import REDIS_GROUP

        marker = await self._arm_marker()
        worker = self.worker
        try:
            groups = await worker.redis.xinfo_groups(worker.stream_key + worker.priorities[-1])
        except Exception as error:
            if "no such key" in str(error).lower():
                return marker, None  # no stream yet (or lost): nothing taken
            raise
        for group in groups:
            if group["name"] == REDIS_GROUP:
                delivered = group["last-delivered-id"]
                return marker, None if delivered in (None, "0-0") else str(delivered)
        return marker, None

    async def _arm_marker(self) -> str:
        """The token in trio_bg's marker key, set to a new one if Redis has none (it is
        new, or lost its data)."""
        from coredis.tokens import PureToken

        token = uuid.uuid4().hex
        key = self.worker.prefix + MARKER_SUFFIX
        found = await self.worker.redis.set(key, token, condition=PureToken.NX, get=True)
        self.marker = token if found is None else str(found)
        return self.marker

    async def _warn_unless_persistent(self) -> None:
        """A WARNING if this Redis keeps its data only in memory (or cannot tell)."""
        where = f"Redis for {self._describe_queue()}"
        try:
            config = await self.worker.redis.config_get(["appendonly", "save"])
        except Exception as error:  # managed services often refuse CONFIG
            logger.warning(
                "%s: could not check whether it persists its data (CONFIG GET refused: %s); "
                "if it restarts without its data, trio_bg resends what it can (see the docs)",
                where,
                _describe(error),
            )
            return
        if config.get("appendonly") == "no" and not config.get("save"):
            logger.warning(
                "%s does not persist its data (appendonly no, save ''): a restart loses "
                "the tasks it holds; turn on appendonly yes (or save) in its configuration",
                where,
            )

    def _describe_queue(self) -> str:
        return f"streaq queue {self.worker.queue_name!r}"

    async def _ship(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            shipment, self._open = self._open, None
            if shipment is None:
                if self._closed:
                    return
                continue
            self._on_its_way = shipment
            error = None
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    await self._publish(shipment.tasks)
            except trio.TooSlowError:
                # The batch may have reached Redis before the answer failed to come: a
                # worker may run its tasks. Never counted as discarded.
                error = HandoffError(
                    _may_have_them(
                        f"Redis did not answer within {SEND_TIMEOUT}s for "
                        f"{len(shipment.tasks)} task(s)"
                    ),
                    in_doubt=True,
                )
            except Exception as failure:  # (groups too: see _describe)
                problem = f"Redis did not take {len(shipment.tasks)} task(s): {_describe(failure)}"
                in_doubt = not _never_connected(failure)
                error = HandoffError(
                    _may_have_them(problem) if in_doubt else problem, in_doubt=in_doubt
                )
            if error is not None:
                logger.error("%s", error)
            self._on_its_way = None
            shipment.settle(error)
            if self._closed and self._open is None:
                return

    async def _publish(self, tasks: Sequence[Task], *, reloaded: bool = False) -> None:
        from coredis.exceptions import ResponseError
        from streaq.utils import now_ms, to_ms

        worker = self.worker
        now = now_ms()
        # What streaq's Worker.publish_task sends for a task to run now (no delay, no
        # schedule, no dependencies, the default priority), as one FCALL of streaq's
        # own Redis function: without streaq's Python wrapper around it, which checks
        # every call's arguments against a signature and costs more than all the rest.
        priority = worker.priorities[-1]
        stream, queue = worker.stream_key + priority, worker.queue_key + priority
        shared = (worker.dependents_key, worker.dependencies_key, worker.results_key)
        # The record is the JSON the worker reads (the worker was checked to read
        # JSON), made of the arguments encoded when they were checked.
        ending = f',"t":{now}}}'
        try:
            async with worker.redis.pipeline(transaction=False) as pipe:
                for task in tasks:
                    identifier = task.id  # (streaq's task id: the same as here)
                    remote = task.remote
                    assert remote is not None
                    record = remote.record
                    if remote.trace is not None:
                        record += f',"trio_bg":{{"trace":{json.dumps(remote.trace)}}}'
                    expire = to_ms(remote.registered.expire or 0)
                    pipe.fcall(
                        "publish_task",
                        keys=[stream, queue, worker.task_key + identifier, *shared],
                        args=[identifier, record + ending, 0, expire, now],
                    )
        except ResponseError as error:
            # A Redis restarted without persistence has lost streaq's functions (and
            # trio_bg's marker: the guard looks at once).
            if reloaded or "function not found" not in str(error).lower():
                raise
            await self._load_library()
            await self._arm_marker()
            self.look_now.set()
            await self._publish(tasks, reloaded=True)
            return
        marker = self.marker
        # publish_task answers with the entry it added to the stream. (Redis has the
        # tasks whatever the answers say: one that cannot be read leaves its task
        # unwatched, never unsent.)
        for task, entry in zip(tasks, pipe.results or (), strict=False):
            assert task.remote is not None
            if isinstance(entry, str):
                task.remote.receipt = Receipt(marker, entry)
            elif entry == 0 and task.keyed:
                # streaq stores a task only if Redis has none with its id: a keyed task
                # another web process handed off first is a duplicate, not sent again.
                task.duplicate = True

    async def _load_library(self) -> None:
        import streaq
        from streaq.types import Streaq

        code = await trio.Path(Path(streaq.__file__).parent / "lua" / "streaq.lua").read_text()
        self.worker._lib = await Streaq(self.worker.redis, code=code, replace=True)
        logger.warning("Redis had lost streaq's functions (restarted?): loaded them again")


def _never_connected(error: BaseException) -> bool:
    """Whether ``error`` (and every error in it, for a group) says that no connection
    to Redis could be made: then nothing of the batch was written."""
    from coredis.exceptions import ConnectionError

    if isinstance(error, BaseExceptionGroup):
        return all(map(_never_connected, error.exceptions))
    # coredis has no class of its own for this: its message is the sign.
    return isinstance(error, ConnectionError) and str(error).startswith(
        "Unable to establish a connection"
    )


def _may_have_them(problem: str) -> str:
    return f"{problem}; Redis may have the tasks, and a worker may run them"


def _describe(error: BaseException) -> str:
    """What went wrong, from the innermost errors of any group (streaq's task groups
    wrap coredis's errors)."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"
