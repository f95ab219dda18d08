"""A nursery's remote tasks on their way to streaq workers: checked at admission, handed
to Redis (with a journal: kept in it first, then forwarded in batches), and watched,
once Redis has them, until a worker took them (see `redis_guard`): what Redis forgot
is handed off again from the journal, or counted."""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import trio

from .._engine.tasks import Task
from .._errors import HandoffError, needs_a_handoff
from .handoff import Handoff
from .journal_file import REMOTE_PREFIX
from .redis_guard import LOOK_EVERY, Receipt, RedisGuard

if TYPE_CHECKING:
    from .._engine.tracing import TaskTracer
    from .journal_keeper import JournalKeeper
    from .port import NurseryPort

logger = logging.getLogger("trio_bg")

SEND_BATCH = 1_000
"""Remote tasks the forwarder hands to Redis in one round trip, at most."""

FORWARD_FIRST = 0.1
FORWARD_MAX = 5.0
"""Seconds the forwarder waits before it tries Redis again: the first wait, doubling
up to the last."""


class RemoteKeeper:
    """The hand-off's part in a nursery's remote tasks (see the module)."""

    def __init__(self, handoff: Handoff, nursery: NurseryPort) -> None:
        self.handoff = handoff
        self._nursery = nursery
        self.journal: JournalKeeper | None = None  # with one, the journal is the outbox
        # Remote tasks kept in the journal, waiting (pending) for the forwarder.
        self._outbox: deque[Task] = deque()
        self._outbox_wake = trio.Event()
        # Those still in the outbox when the grace period ended (kept for next time),
        # those Redis forgot that the journal handed off again, and those it forgot
        # that no journal kept.
        self.left_in_outbox = self.resent = self.maybe_lost = 0
        self._guard = RedisGuard()

    def __len__(self) -> int:
        """Remote tasks Redis has that no worker has taken yet (watched)."""
        return len(self._guard)

    # -- a task's steps ------------------------------------------------------------

    def check(self, task: Task, tracer: TaskTracer | None) -> None:
        """At admission: a remote task needs this nursery's streaq worker; it takes the
        caller's trace along."""
        assert task.remote is not None
        worker = self.handoff.origin
        if task.remote.registered.worker is not worker:
            raise needs_a_handoff(
                task.name,
                f"this background nursery hands off to another streaq worker "
                f"(queue {worker.queue_name!r})",
            )
        if tracer is not None:
            task.remote.trace = tracer.carrier()  # (the caller's: the request's)

    def accept(self, task: Task) -> None:
        """An accepted remote task: Redis has it already (it is the workers' now), or,
        kept in the journal, it waits for the forwarder."""
        assert task.remote is not None
        if task.remote.sent:
            self._nursery.end(task, "handed_off")
        elif self._nursery.cancelled:
            self._nursery.end(task, "cancelled")  # past the grace period: kept for later
        else:
            self._nursery.hold(task)
            self._outbox.append(task)
            self._outbox_wake.set()

    def handed_off(self, task: Task) -> None:
        """Redis acknowledged ``task``: watch it until a worker has taken it."""
        assert task.remote is not None
        if task.remote.receipt is not None:
            self._guard.watch(task.remote.receipt, task.journal_id)

    def cancel(self) -> None:
        """The grace period is over: what the outbox holds stays in the journal for the
        next start (a batch on its way is the forwarder's to settle)."""
        if self._outbox:
            logger.warning(
                "%d remote task(s) not yet handed to Redis stay in the journal for the next start",
                len(self._outbox),
            )
            self.left_in_outbox += len(self._outbox)
            self._forwarded(list(self._outbox), "cancelled")
            self._outbox.clear()

    # -- rows of the journal ---------------------------------------------------------

    def task_named(self, name: str) -> Callable[..., Any] | None:
        """The function of a journal row's remote task (None: not a remote row)."""
        if not name.startswith(REMOTE_PREFIX):
            return None
        task: Callable[..., Any] | None = self.handoff.worker.registry.get(
            name.removeprefix(REMOTE_PREFIX)
        )
        return task

    def names(self) -> list[str]:
        """The journal's names of the remote tasks this process can hand off."""
        return [REMOTE_PREFIX + name for name in self.handoff.worker.registry]

    def sent(self, journal_id: int, receipt: str) -> bool:
        """A journal row that Redis has already: watched from here (True), unless its
        receipt cannot be read (False: it is handed off again)."""
        with contextlib.suppress(ValueError):
            self._guard.watch(Receipt.decode(receipt), journal_id)
            return True
        return False

    # -- the forwarder and the watch ---------------------------------------------------

    async def forward(self) -> None:
        """Hand the journal's remote tasks to Redis, in batches, in order; while Redis
        cannot take them they wait (pending, in the journal), and it tries again."""
        handoff = self.handoff
        delay = 0.0
        while True:
            while not self._outbox:
                self._outbox_wake = trio.Event()
                await self._outbox_wake.wait()
            await handoff.wait_connected()
            batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), SEND_BATCH))]
            if cancelled := [task for task in batch if task.cancel_requested]:
                self._forwarded(cancelled, "cancelled")  # (by cancel_task: its row goes)
                batch = [task for task in batch if not task.cancel_requested]
                if not batch:
                    continue
            try:
                await handoff.send(batch)
            except HandoffError as error:
                if self._nursery.cancelled:
                    self.left_in_outbox += len(batch)
                    self._forwarded(batch, "cancelled")
                    return
                self._outbox.extendleft(reversed(batch))  # first in line, still
                if not delay:
                    logger.warning(
                        "remote tasks wait in the journal until Redis takes them (%s)", error
                    )
                delay = min(max(2 * delay, FORWARD_FIRST), FORWARD_MAX)
                await trio.sleep(delay)
                continue
            if delay:
                logger.warning("Redis takes remote tasks again: the journal's are on their way")
                delay = 0.0
            if cancelled := [task for task in batch if task.cancel_requested]:
                # Cancelled while their batch was on its way: the workers abort them.
                await _abort_all(handoff, cancelled)
                self._forwarded(cancelled, "cancelled")
                batch = [task for task in batch if not task.cancel_requested]
            self._forwarded(batch, "handed_off")

    def _forwarded(self, batch: list[Task], outcome: Literal["handed_off", "cancelled"]) -> None:
        for task in batch:
            assert task.remote is not None
            task.remote.sent = outcome == "handed_off"
            self._nursery.release(task, outcome)

    async def watch(self) -> None:
        """While Redis holds remote tasks no worker has taken, look at it every
        `LOOK_EVERY` seconds (at once on a new connection): the journal's rows of
        tasks a worker took go; tasks Redis lost are handed off again from the
        journal, or, without one, counted and reported as perhaps lost."""
        handoff = self.handoff
        while True:
            with trio.move_on_after(LOOK_EVERY):
                await handoff.look_now.wait()
            handoff.look_now = trio.Event()
            if not self._guard:
                continue
            try:
                marker, delivered = await handoff.look()
            except Exception:  # (the hand-off sees the connection's troubles and says so)
                continue
            found = self._guard.sort(marker, delivered)
            if self.journal is not None and found.taken:
                self.journal.journal.remove([id for id in found.taken if id is not None])
            if found.lost:
                self._redis_lost(found.lost)

    def _redis_lost(self, lost: list[int | None]) -> None:
        """Redis lost its data since it acknowledged these tasks (journal ids; None for
        a task no journal keeps), before any worker took them."""
        ids = [id for id in lost if id is not None]
        why = "Redis lost its data (restarted without persistence, or failed over)"
        if ids:
            assert self.journal is not None
            self.journal.journal.unsend(ids)
            self.resent += len(ids)
            self.journal.wake.set()
            logger.error(
                "%s: %d remote task(s) it had acknowledged, that no worker had taken, are "
                "handed off again from the journal",
                why,
                len(ids),
            )
        if missing := len(lost) - len(ids):
            self.maybe_lost += missing
            logger.error(
                "%s: %d remote task(s) it had acknowledged, that no worker had taken, may "
                "be lost; with a journal they would be handed off again",
                why,
                missing,
            )


async def _abort_all(handoff: Handoff, tasks: list[Task]) -> None:
    """Add ``tasks`` to streaq's abort set: a worker that takes one aborts it."""
    for task in tasks:
        try:
            await handoff.worker.abort_by_id(task.id, timeout=0)
        except Exception as error:  # (Redis went away again: it may run)
            logger.warning("could not abort remote task %s [%s]: %r", task.name, task.id, error)
