"""The journal of durable tasks, seen from trio: one thread owns the SQLite connection
and commits, in one transaction, everything handed to it since its last commit."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, final

import trio

from .._errors import JournalError
from . import journal_file, journal_schema
from .journal_file import REMOTE_PREFIX

if TYPE_CHECKING:
    from .._engine.tasks import Task

logger = logging.getLogger("trio_bg")

DEFAULT_LEASE = 20.0
"""Seconds a process's claim on its journal rows lasts without renewal: the rows of a
process that died are resumed by another within this, plus a quarter of it (another
process releases them as it renews its own lease) and a poll (a tenth of it)."""

BUSY_TIMEOUT = 5.0
"""Seconds a store (any piece of work someone waits on) waits for another process's
write lock, counted from when it was handed over, however much work is queued."""

LAZY_COMMIT = 0.05
"""Seconds work that nobody waits on (removing the rows of done tasks) waits for work
that someone does, to share its commit: each commit costs a sync to the disk."""

DEFAULT_JOURNAL_STATUSES_KEPT_FOR = 3600.0
"""Seconds the journal keeps an ended task's status (without its arguments), for every
process that shares it."""

SWEEP_EVERY = 60.0
"""Seconds between sweeps of the statuses kept past their time, at least."""


def row_name(task: Task) -> str:
    """The name of ``task``'s row: its own, or, for a remote task, prefixed."""
    return task.name if task.remote is None else REMOTE_PREFIX + task.name


@final
class Claim:
    """This process's hold on a durable task's row, while the task is in its hands."""

    __slots__ = ("journal", "lost")

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.lost = False  # its lease lapsed and the row went to another process


current_claim: contextvars.ContextVar[Claim | None] = contextvars.ContextVar(
    "trio_bg.current_claim", default=None
)


def lease_held() -> bool:
    """Whether the durable task calling this still holds its journal row: ask before a
    side effect that must never happen twice. False once this process's lease has run
    out unrenewed (it was paused, or its disk stalled) even if no other process took the
    row yet, and for good once another did. True outside a durable task. Cheap: no I/O.
    """
    claim = current_claim.get()
    return claim is None or (not claim.lost and time.time() < claim.journal.expires)


_Run = Callable[[sqlite3.Connection], Any]
_Kind = Literal["store", "remove", "end", "sent", "progress"]


@final
class _Op:
    """One piece of work for the journal's thread; awaited (``done``) or not."""

    __slots__ = ("batch", "deadline", "done", "error", "result", "run", "waiters", "what")

    def __init__(self, run: _Run | None, what: str, *, awaited: bool) -> None:
        self.run = run  # None: close the connection and stop
        self.what = what
        self.batch: _Batch | None = None  # what it writes: closed once the thread takes it
        self.done = trio.Event() if awaited else None
        # When it stops waiting for the write lock (monotonic); none if nobody waits.
        self.deadline = time.monotonic() + BUSY_TIMEOUT if awaited else math.inf
        self.waiters: list[trio.lowlevel.Task] = []  # (see Journal._wait)
        self.result: Any = None
        self.error: BaseException | None = None


@final
class _Batch:
    """Tasks to store, or rows to remove, gathered until the journal's thread takes them:
    one piece of work however many tasks, so each costs a row, not a round trip."""

    __slots__ = ("items", "kind", "op")

    def __init__(self, kind: _Kind) -> None:
        self.kind = kind
        self.items: list[Any] = []
        self.op: _Op  # set by the one who opened the batch


class Journal:
    """The durable tasks' journal file, and the thread that owns its connection.

    Group commit: whatever trio hands over while the thread commits goes into its
    next transaction, so under load one commit (and one hop back to trio) serves many
    tasks, with no window to wait out when idle. Tasks to store and rows to remove are
    gathered in batches, so a busy server costs the thread one statement per row. The
    thread also renews this process's lease, so a slow event loop never loses it.
    """

    def __init__(
        self, path: str, *, lease: float, synchronous: str, statuses_kept_for: float
    ) -> None:
        """Private: use `Journal.open`."""
        self.path = path
        self.lease = lease
        # How long ended tasks' statuses are kept (0: not at all; their rows just go).
        self.statuses_kept_for = statuses_kept_for
        self._synchronous = synchronous
        self._inbox: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._owner = 0  # this process's id among the journal's owners
        # When this process's lease runs out (wall clock, as the other processes judge
        # it), as last committed: read from any thread by `lease_held`.
        self.expires = 0.0
        # Called in trio's thread when a renewal finds the lease had lapsed and been
        # reaped, with the ids of the rows this process still holds (set by the nursery).
        self.on_lease_lost: Callable[[set[int]], object] | None = None
        self._connection: sqlite3.Connection | None = None
        self._sweep_at = 0.0  # (monotonic: see _renew)
        # The batches being gathered (None: none open); the thread closes one when it
        # takes it, under the lock, so no task joins a batch once it is being written.
        self._batch_lock = threading.Lock()
        self._open: dict[_Kind, _Batch] = {}
        self._thread = threading.Thread(target=self._work, name="trio_bg journal", daemon=True)

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        lease: float,
        synchronous: str,
        statuses_kept_for: float = DEFAULT_JOURNAL_STATUSES_KEPT_FOR,
    ) -> Journal:
        """Open (or create) the journal at ``path`` and join it as one of its owners;
        `JournalError` if it cannot be used."""
        journal = cls(
            path, lease=lease, synchronous=synchronous, statuses_kept_for=statuses_kept_for
        )
        journal._thread.start()
        journal._owner = await journal._call(journal._connect, f"open the journal {path}")
        logger.info("journal %s opened (owner %d)", path, journal._owner)
        return journal

    # -- from trio -----------------------------------------------------------------

    async def append(self, tasks: Sequence[Task]) -> None:
        """Store ``tasks``, claimed by this process; return once committed (setting
        each task's ``journal_id``), or raise `JournalError`."""
        await self._wait(self._add_to_batch("store", tasks))

    def remove(self, ids: Sequence[int]) -> None:
        """Delete the rows of tasks that are done, or will never run (not awaited)."""
        self._add_to_batch("remove", ids)

    def end(self, ended: journal_file.EndedTask) -> None:
        """A task ended: its row goes, and its status is kept for `statuses_kept_for`
        seconds (not awaited; with none kept, the row just goes)."""
        if self.statuses_kept_for > 0:
            self._add_to_batch("end", (ended,))
        else:
            self._add_to_batch("remove", (ended[0],))

    def _add_to_batch(self, kind: _Kind, items: Sequence[Any]) -> _Op:
        """Add ``items`` to the open batch of ``kind`` (opening one if need be); the
        batch's piece of work."""
        with self._batch_lock:
            batch = self._open.get(kind)
            if opened := batch is None:
                batch = self._open[kind] = _Batch(kind)
                if kind == "store":
                    batch.op = _Op(partial(self._store, batch), "store durable tasks", awaited=True)
                elif kind == "remove":
                    batch.op = _Op(partial(self._remove, batch), "remove done tasks", awaited=False)
                elif kind == "end":
                    batch.op = _Op(partial(self._end, batch), "end done tasks", awaited=False)
                elif kind == "progress":
                    batch.op = _Op(
                        partial(self._set_progress, batch), "record progress", awaited=False
                    )
                else:
                    batch.op = _Op(
                        partial(self._mark_sent, batch), "record hand-offs", awaited=False
                    )
                batch.op.batch = batch
            batch.items.extend(items)
        if opened:
            self._inbox.put(batch.op)
        return batch.op

    def mark_sent(self, journal_id: int, receipt: str) -> None:
        """Record that Redis acknowledged remote task ``journal_id`` with ``receipt``
        (not awaited): its row stays until a worker has taken it."""
        self._add_to_batch("sent", ((journal_id, receipt),))

    def unsend(self, ids: Sequence[int]) -> None:
        """Queue remote tasks again that Redis lost (not awaited): any process may
        claim them and hand them off anew."""
        self._post(partial(journal_file.unsend, owner=self._owner, ids=ids), "resend tasks")

    def set_progress(self, journal_id: int, fraction: float | None, message: str | None) -> None:
        """Record how far a task got (not awaited: it rides along with the next commit;
        of several for one task, the last is written). From any thread."""
        self._add_to_batch("progress", ((journal_id, fraction, message),))

    def set_attempt(self, journal_id: int, attempt: int) -> None:
        """Record that a task's retry is due (not awaited)."""
        self._post(
            partial(journal_file.set_attempt, owner=self._owner, id=journal_id, attempt=attempt),
            f"record attempt {attempt} of task {journal_id}",
        )

    async def start(self, ids: Sequence[int]) -> None:
        """Record that the tasks of ``ids`` start their attempts; return once committed
        (in whatever transaction is next: no commit of its own when busy)."""
        await self._call(
            partial(journal_file.start, owner=self._owner, ids=ids), "record that tasks start"
        )

    def bury(self, journal_id: int, error: str) -> None:
        """Make a task that failed its last attempt a dead letter (not awaited)."""
        self._post(
            partial(journal_file.bury, owner=self._owner, id=journal_id, error=error),
            f"keep task {journal_id} as a dead letter",
        )

    async def claim(self, names: Sequence[str], limit: int) -> list[journal_file.Row]:
        """Claim up to ``limit`` tasks that no live process holds, of known ``names``."""
        rows: list[journal_file.Row] = await self._call(
            partial(journal_file.claim, owner=self._owner, names=names, limit=limit),
            "claim tasks",
        )
        return rows

    async def find(self, task_id: str) -> journal_file.Row | journal_file.EndedRow | None:
        """The row of task ``task_id`` if the journal has one, else what it kept of it
        once it ended, if anything."""
        row: journal_file.Row | journal_file.EndedRow | None = await self._call(
            partial(journal_file.find, task_id=task_id), "look up a task"
        )
        return row

    async def withdraw(self, task_id: str) -> bool:
        """Delete task ``task_id``'s row if it is queued and nobody's (no process has
        claimed it): True if it was."""
        withdrawn: bool = await self._call(
            partial(journal_file.withdraw, task_id=task_id), "cancel a task"
        )
        return withdrawn

    async def counts(self) -> dict[str, int]:
        """How many rows the journal holds (see `journal_file.counts`)."""
        counts: dict[str, int] = await self._call(journal_file.counts, "count its rows")
        return counts

    async def dead_letters(self, limit: int) -> list[journal_file.Row]:
        """The oldest ``limit`` dead letters."""
        rows: list[journal_file.Row] = await self._call(
            partial(journal_file.rows, state="dead", limit=limit), "list the dead letters"
        )
        return rows

    async def requeue(self, ids: Sequence[int | str]) -> int:
        """Queue the dead letters of ``ids`` (row or task ids) again; how many."""
        count: int = await self._call(
            partial(journal_file.requeue_dead, ids=ids), "retry dead letters"
        )
        return count

    async def purge(self, ids: Sequence[int | str]) -> int:
        """Delete the dead letters of ``ids`` (row or task ids); how many."""
        count: int = await self._call(
            partial(journal_file.purge_dead, ids=ids), "purge dead letters"
        )
        return count

    async def unknown(self, names: Sequence[str]) -> dict[str, int]:
        """Queued tasks whose name is none of ``names``, counted by name."""
        counts: dict[str, int] = await self._call(
            partial(journal_file.unknown, names=names), "count tasks of unknown names"
        )
        return counts

    async def close(self, keep: Sequence[int]) -> None:
        """Release this process's rows (but ``keep``, tasks abandoned in threads that may
        still run: they wait for the lease to expire), then close the connection."""
        try:
            await self._call(partial(journal_file.leave, owner=self._owner, keep=keep), "leave")
        finally:
            await self._call(None, "close the journal")
            await trio.to_thread.run_sync(self._thread.join)

    async def _call(self, run: _Run | None, what: str) -> Any:
        op = _Op(run, what, awaited=True)
        self._inbox.put(op)
        return await self._wait(op)

    @staticmethod
    async def _wait(op: _Op) -> Any:
        assert op.done is not None
        if op.done.is_set():
            await trio.lowlevel.checkpoint()
        else:
            # Not cancellable: a commit takes a millisecond or so, and waiting it out
            # keeps the books exact (a request cancelled meanwhile still discards what
            # was stored for it). Cheaper than a shielded cancel scope, on every request.
            op.waiters.append(trio.lowlevel.current_task())
            await trio.lowlevel.wait_task_rescheduled(_not_now)
        if op.error is not None:
            raise op.error
        return op.result

    def _post(self, run: _Run, what: str) -> None:
        self._inbox.put(_Op(run, what, awaited=False))

    # -- in the journal's thread ---------------------------------------------------

    def _connect(self, _: object) -> int:
        self._connection = journal_schema.connect(
            self.path, synchronous=self._synchronous, busy_timeout=BUSY_TIMEOUT
        )
        if exposed := journal_schema.exposed(self.path):
            logger.warning(
                "journal %s: others than its owner may read or write %s, and the task "
                "arguments in it; make it private: chmod 600 %s",
                self.path,
                ", ".join(exposed),
                " ".join(exposed),
            )
        expires = time.time() + self.lease
        owner = journal_file.join(self._connection, self.lease)
        self.expires = expires
        return owner

    def _work(self) -> None:
        opening = self._inbox.get()
        self._run_alone(opening, self._connect)
        self._deliver([opening])
        if opening.error is not None:
            return
        renew_every = self.lease / 4
        renew_at = time.monotonic() + renew_every
        while True:
            batch = self._gather(max(0.0, renew_at - time.monotonic()))
            if batch and not any(op.done is not None or op.run is None for op in batch):
                # Nobody waits on this (rows to remove, a dead letter): it rides along
                # with the next commit someone waits for, if one comes soon; a lost
                # removal only means the task runs again, which at-least-once allows.
                batch += self._gather(LAZY_COMMIT)
            renewal = None
            if time.monotonic() >= renew_at:
                renew_at = time.monotonic() + renew_every
                renewal = _Op(self._renew, "renew the lease", awaited=False)
                batch.insert(0, renewal)
            stop = next((op for op in batch if op.run is None), None)
            work = [op for op in batch if op.run is not None]
            if work:
                self._commit(work)
            if renewal is not None and renewal.error is None:
                self._renewed(*renewal.result)
            if stop is not None:
                self._run_alone(stop, lambda connection: connection.close())
                self._deliver([*work, stop])
                return
            self._deliver(work)

    def _gather(self, timeout: float) -> list[_Op]:
        """The work handed over so far, waiting up to ``timeout`` for the first piece."""
        try:
            batch = [self._inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:  # everything handed over meanwhile: one transaction
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for op in batch:
            if op.batch is not None:
                self._close(op.batch)
        return batch

    def _commit(self, batch: list[_Op]) -> None:
        connection = self._connection
        assert connection is not None
        # The lock is waited for until the earliest deadline in the batch: work queued
        # behind a held lock waits for it once, not once per transaction ahead of it
        # (past its deadline, it gets one try that does not wait).
        deadline = min(op.deadline for op in batch)
        wait = BUSY_TIMEOUT if deadline == math.inf else deadline - time.monotonic()
        try:
            connection.execute(f"PRAGMA busy_timeout = {max(0, int(wait * 1000))}")
            with journal_schema.transaction(connection):
                for op in batch:
                    assert op.run is not None
                    op.result = op.run(connection)
        except Exception as error:  # (the transaction was rolled back)
            if len(batch) == 1 or _busy(error):  # a held lock is no one piece's fault
                for op in batch:
                    op.error = _as_journal_error(error, op.what)
            else:  # each on its own, so that one bad piece of work fails alone
                for op in batch:
                    self._commit([op])

    def _run_alone(self, op: _Op, run: _Run) -> None:
        try:
            op.result = run(self._connection)  # type: ignore[arg-type]
        except Exception as error:
            op.error = _as_journal_error(error, op.what)

    def _close(self, batch: _Batch) -> None:
        """Close ``batch`` to newcomers: the thread has taken it (and will settle it,
        whether its transaction succeeds or not)."""
        with self._batch_lock:
            if self._open.get(batch.kind) is batch:
                del self._open[batch.kind]

    def _store(self, batch: _Batch, connection: sqlite3.Connection) -> None:
        tasks: list[Task] = batch.items
        rows = [
            (row_name(task), task.payload or "[[],{}]", task.attempt, task.id) for task in tasks
        ]
        ids = journal_file.append(connection, self._owner, rows)
        for task, journal_id in zip(tasks, ids, strict=True):
            task.journal_id = journal_id  # (read in trio's thread once the batch is settled)
            # Not stored: a queued row has its id (its deduplication key) already.
            task.duplicate = task.journal_id is None

    def _set_progress(self, batch: _Batch, connection: sqlite3.Connection) -> None:
        latest = {journal_id: (journal_id, *said) for journal_id, *said in batch.items}
        journal_file.set_progress(connection, self._owner, list(latest.values()))

    def _remove(self, batch: _Batch, connection: sqlite3.Connection) -> None:
        journal_file.remove(connection, self._owner, batch.items)

    def _end(self, batch: _Batch, connection: sqlite3.Connection) -> None:
        journal_file.end(connection, self._owner, batch.items)

    def _mark_sent(self, batch: _Batch, connection: sqlite3.Connection) -> None:
        journal_file.mark_sent(connection, self._owner, batch.items)

    def _renew(self, connection: sqlite3.Connection) -> tuple[float, set[int] | None]:
        """Renew the lease: when it will run out, and, if it had lapsed and been reaped,
        the rows this process still holds (the others went to other processes)."""
        expires = time.time() + self.lease  # (read before renew reads it: never later)
        held = None
        if not journal_file.renew(connection, self._owner, self.lease):
            logger.error(
                "journal %s: this process's lease had expired (it, its event loop or its "
                "disk stalled for over %ss): another process may have claimed and run "
                "some of its tasks; it cancels its own runs of those",
                self.path,
                self.lease,
            )
            held = journal_file.held(connection, self._owner)
        journal_file.reap(connection, self._owner)
        if time.monotonic() >= self._sweep_at:  # (with none kept: those of earlier runs)
            self._sweep_at = time.monotonic() + SWEEP_EVERY
            journal_file.sweep(connection, self.statuses_kept_for)
        return expires, held

    def _renewed(self, expires: float, held: set[int] | None) -> None:
        """The renewal is committed: publish the lease's new end, once trio has marked
        the tasks of lost rows if it had lapsed (so `lease_held` never says True for
        them)."""
        if held is None:
            self.expires = expires
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._lease_lost, held, expires)

    def _lease_lost(self, held: set[int], expires: float) -> None:
        if self.on_lease_lost is not None:
            self.on_lease_lost(held)
        self.expires = expires

    def _deliver(self, batch: list[_Op]) -> None:
        """One hop to trio per batch, when someone waits or something failed."""
        news = [op for op in batch if op.done is not None or op.error is not None]
        if news:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(_settle, news)


def _not_now(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED  # a cancellation waits until the commit is done


def _settle(batch: list[_Op]) -> None:
    for op in batch:
        if op.done is not None:
            op.done.set()
            for task in op.waiters:
                trio.lowlevel.reschedule(task)
        elif op.error is not None:
            logger.error("%s", op.error)  # (it says what the journal could not do)


def _busy(error: Exception) -> bool:
    """Whether ``error`` is SQLite's "database is locked" (SQLITE_BUSY or _LOCKED)."""
    return isinstance(error, sqlite3.OperationalError) and error.sqlite_errorcode & 0xFF in (5, 6)


def _as_journal_error(error: Exception, what: str) -> Exception:
    if isinstance(error, JournalError):
        return error
    if isinstance(error, sqlite3.Error):
        return journal_schema.journal_error(error, f"the journal could not {what}")
    return error
