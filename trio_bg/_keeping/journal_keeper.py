"""A nursery's durable tasks, as the journal keeps them: the feeder that takes the rows
no live process holds, the record of each start before it runs (so a run its process
died in counts as an attempt), this process's claims on its rows (runs cancelled when
its lease lapsed and another process took them), and what each end writes."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from .._engine.calls import spec_of
from .._engine.durable import decode_arguments, registered, registered_names
from .._engine.report import names_with_counts
from .._engine.status import describe_error
from .._engine.tasks import Task
from .._errors import JournalError
from .journal import Claim, Journal, current_claim
from .journal_file import Row

if TYPE_CHECKING:
    from .._engine.events import Outcome
    from .port import NurseryPort
    from .remote_keeper import RemoteKeeper

logger = logging.getLogger("trio_bg")

CLAIM_BATCH = 1_000
"""Journal rows claimed in one transaction, at most."""


class JournalKeeper:
    """The journal's part in a nursery's durable tasks (see the module)."""

    def __init__(
        self,
        journal: Journal,
        nursery: NurseryPort,
        *,
        max_running: int,
        max_pending: int,
    ) -> None:
        self.journal = journal
        self._nursery = nursery
        # Half the pending room stays free for new requests while a backlog drains.
        self._limit = max_running + max_pending // 2
        self._remote: RemoteKeeper | None = None  # (see keep_remote)
        # Tasks taken from the journal, durable tasks left in it for a later run (of
        # those, ``kept`` were abandoned in threads that may still run), rows of names
        # unknown here, and tasks whose rows went to another process.
        self.recovered = self.deferred = self.unknown = self.lease_lost = 0
        self.kept: list[int] = []
        # The durable tasks in this process's hands (placed, not yet ended).
        self._claims: dict[Task, Claim] = {}
        # The last claim found more than it could take: a task's end wakes the feeder.
        self._backlog = False
        self.wake = trio.Event()
        # Tasks given a running slot, waiting for the journal to record their start.
        self._starting: list[Task] = []
        self._starts_wake = trio.Event()
        journal.on_lease_lost = self._rows_lost

    def keep_remote(self, remote: RemoteKeeper) -> None:
        """Keep ``remote``'s tasks too: the journal is their outbox, and their rows stay
        until a worker has taken them from Redis."""
        self._remote = remote
        remote.journal = self

    # -- a task's steps ------------------------------------------------------------

    def lost(self, task: Task) -> bool:
        """Whether durable ``task``, being placed, lost its row to another process.
        (Its claim is made here, the first time: its context carries it.)"""
        claim = self._claims.get(task)
        if claim is None:
            claim = self._claims[task] = Claim(self.journal)
            if task.context is None:
                task.context = contextvars.copy_context()
            task.context.run(current_claim.set, claim)
        return claim.lost

    def start(self, task: Task) -> None:
        """Launch durable ``task`` (it holds a slot) once the journal has recorded its
        start (see `record_starts`)."""
        if task.context is None:
            task.context = contextvars.copy_context()  # (the caller's, as it runs later)
        self._starting.append(task)
        self._starts_wake.set()

    def retrying(self, task: Task) -> None:
        """Durable ``task`` waits for its retry: its row says which attempt is next."""
        assert task.journal_id is not None
        self.journal.set_attempt(task.journal_id, task.attempt)

    def ended(self, task: Task, outcome: Outcome, error: BaseException | None) -> None:
        """A task ended: room for a row of the backlog; a durable one's row is done
        (it goes, its status kept a while, as is one cancelled by `cancel_task`), dead
        (a dead letter),
        handed to Redis (its receipt, see `RemoteKeeper`), or cut short by the shutdown
        (it stays, for the next start)."""
        if self._backlog:
            self.wake.set()
        if (journal_id := task.journal_id) is None:
            return
        claim = self._claims.pop(task, None)
        if claim is not None and claim.lost:
            return  # its row is another process's now: not this one's to settle
        journal = self.journal
        if outcome == "handed_off" and task.remote is not None and task.remote.receipt:
            journal.mark_sent(journal_id, task.remote.receipt.encode())
        elif outcome == "handed_off":  # (its status is Redis's to tell)
            journal.remove((journal_id,))
        elif outcome == "completed" or task.cancel_requested:
            # Its row goes; its status stays a while (cancelled by cancel_task, too).
            state = "completed" if outcome == "completed" else "cancelled"
            now = time.time()
            journal.end(
                (
                    journal_id,
                    state,
                    task.name,
                    task.attempt,
                    task.progress,
                    task.message,
                    task.result,
                    None if error is None else describe_error(error),
                    task.started,
                    now,
                    now + task.key_ttl if task.key_ttl else None,
                )
            )
        elif outcome == "failed":
            journal.bury(journal_id, f"attempt {task.attempt}: {error!r}")
        elif outcome == "timed_out":
            journal.bury(journal_id, f"attempt {task.attempt}: timed out after {task.timeout}s")
        else:
            self.deferred += 1
            if outcome == "abandoned":  # its thread may still run: not for others yet
                self.kept.append(journal_id)

    def discarded(self, tasks: Iterable[Task]) -> None:
        """Tasks that will never run: their rows go."""
        if stored := [task.journal_id for task in tasks if task.journal_id is not None]:
            self.journal.remove(stored)

    # -- the feeder and the starts ---------------------------------------------------

    async def feed(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Take the journal's tasks that no live process holds (left by an earlier run,
        deferred by a draining process, or of a process that died): first as many as
        there is room for, before the nursery is reported started; then, until the
        shutdown, whenever room frees up while more wait, and every poll interval."""
        journal = self.journal
        unknown = await journal.unknown(self._names())
        if unknown:
            self.unknown = sum(unknown.values())
            logger.error(
                "journal %s holds %d task(s) of names no durable task here has; they stay "
                "in the journal until a process that has them starts: %s",
                journal.path,
                self.unknown,
                ", ".join(f"{name} ({count})" for name, count in unknown.items()),
            )
        await self._claim_while_room()
        task_status.started()
        poll = journal.lease / 10
        while not self._nursery.closed:
            with trio.move_on_after(poll):
                await self.wake.wait()
            self.wake = trio.Event()
            try:
                await self._claim_while_room()
            except JournalError as error:  # a passing disk or lock trouble: try again
                logger.error("%s", error)

    async def _claim_while_room(self) -> None:
        """Claim as many rows as there is room for now (not more as tasks end meanwhile:
        that is the next round's), in batches."""
        room = self._nursery.room(self._limit)
        while room > 0 and not self._nursery.closed:
            asked = min(room, CLAIM_BATCH)
            rows = await self.journal.claim(self._names(), asked)
            for row in rows:
                self._take(row)
            if len(rows) < asked:
                self._backlog = False  # the journal has no more for us now
                return
            room -= asked
        self._backlog = True  # more may wait: a task's end starts the next round

    def _names(self) -> list[str]:
        """The names of the journal's rows this process can run (or hand off)."""
        remote = self._remote
        return registered_names() + ([] if remote is None else remote.names())

    def _take(self, row: Row) -> None:
        journal = self.journal
        if row.state == "dead":  # it cannot be read: claim made it a dead letter
            logger.error("journal %s: task %d (%s) %s", journal.path, row.id, row.name, row.error)
            return
        remote = self._remote
        if row.sent is not None and remote is not None and remote.sent(row.id, row.sent):
            return  # Redis has it: watched until a worker takes it
        func = registered(row.name)
        if func is None and remote is not None:
            func = remote.task_named(row.name)
        try:
            assert func is not None  # (only known names are claimed)
            args, kwargs = decode_arguments(row.arguments)
            task = Task(
                func, args, kwargs, payload=row.arguments, id=row.task_id, created=row.created
            )
        except (TypeError, ValueError) as error:  # the function changed since
            logger.error(
                "journal %s: task %d (%s) cannot run: %s", journal.path, row.id, row.name, error
            )
            journal.bury(row.id, f"cannot run from the journal: {error}")
            return
        task.journal_id = row.id
        task.attempt = row.attempt
        if row.started and not self._after_death(task):
            return
        self.recovered += 1
        self._nursery.take(task)

    def _after_death(self, task: Task) -> bool:
        """``task``'s last run died with its process (a crash, an OOM kill, a SIGKILL:
        from here, a task that killed it looks like a deploy that did). That was an
        attempt: whether it may have another (recorded), or is now a dead letter."""
        assert task.journal_id is not None
        journal = self.journal
        last = max(task.retries + 1, spec_of(task.func).crash_limit)
        if task.attempt >= last:
            error = f"attempt {task.attempt}: its process died while it ran, its last attempt"
            logger.error(
                "journal %s: task %d (%s) becomes a dead letter: %s",
                journal.path,
                task.journal_id,
                task.name,
                error,
            )
            journal.bury(task.journal_id, error)
            return False
        logger.warning(
            "journal %s: task %d (%s): its process died while attempt %d ran; running "
            "attempt %d of at most %d",
            journal.path,
            task.journal_id,
            task.name,
            task.attempt,
            task.attempt + 1,
            last,
        )
        task.attempt += 1
        journal.set_attempt(task.journal_id, task.attempt)
        return True

    async def record_starts(self) -> None:
        """Record in the journal that durable tasks start, then launch them: all those
        given a slot meanwhile at once, in whatever transaction the journal commits
        next. So a run cut short by the death of its process counts as an attempt,
        even one that kills it at once."""
        nursery = self._nursery
        try:
            while True:
                await self._starts_wake.wait()
                self._starts_wake = trio.Event()
                batch, self._starting = self._starting, []
                try:
                    await self.journal.start([t.journal_id for t in batch if t.journal_id])
                except JournalError as error:  # they run all the same: at least once
                    logger.error("%s", error)
                for task in batch:
                    claim = self._claims.get(task)
                    # (A thread task would run: nothing cancels it once started.)
                    if nursery.cancelled or (claim is not None and claim.lost):
                        nursery.attempt_over(task, "cancelled")
                    else:
                        nursery.launch(task)
        finally:  # the tasks were cancelled: those still waiting never start
            batch, self._starting = self._starting, []
            for task in batch:
                nursery.attempt_over(task, "cancelled")

    def _rows_lost(self, held: set[int]) -> None:
        """This process's lease lapsed (it was paused, or its disk stalled) and other
        processes may have claimed its rows: it holds only ``held`` now. Its runs of
        the tasks whose rows it lost are cancelled, and those not started never run.
        Best effort: a task may reach its side effect first (`lease_held` tells it),
        and a thread cannot be interrupted."""
        lost = {task for task in self._claims if task.journal_id not in held}
        if not lost:
            return
        in_threads = 0
        for task in lost:
            self._claims[task].lost = True
            task.revoked = True  # (an attempt not started yet starts cancelled)
            if task.state == "running" and task.scope is not None:
                task.scope.cancel()  # the attempt's own scope (see Attempt)
            if not task.is_async and task.thread_started:
                in_threads += 1
        self._nursery.drop_queued(lost)
        self.lease_lost += len(lost)
        logger.error(
            "journal %s: %d durable task(s) in this process's hands went to other processes "
            "while its lease had lapsed: its runs of them are cancelled%s: %s",
            self.journal.path,
            len(lost),
            f" ({in_threads} in threads run on: a thread cannot be interrupted)"
            if in_threads
            else "",
            names_with_counts(task.name for task in lost),
        )
