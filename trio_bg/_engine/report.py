"""The small frozen records a nursery gives out: live counts and the shutdown report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class TaskStats:
    """A nursery's tasks by state, taken at one moment.

    ``accepted`` counts every task the nursery took since it opened; each is in
    exactly one of the other states, so ``accepted == pending + running + completed
    + failed + timed_out + cancelled + abandoned + handed_off`` always holds. ``pending`` counts
    the tasks not running yet: queued for a running slot, waiting for a worker
    thread, or waiting for a retry (those are also ``retrying``). ``discarded``
    counts tasks admitted by a request whose response never completed: they never
    ran. ``reserved`` counts tasks admitted by requests still being handled, and
    ``rejected`` the calls refused with `Overloaded` because the nursery was full.
    ``oldest_pending_age`` is how long (seconds) the oldest pending task has waited,
    ``threads_in_use`` how many worker threads run plain-function tasks now, and
    ``retried`` how many retries were scheduled so far (one per ``"retrying"`` event).

    With a journal: ``recovered`` counts the accepted tasks that were taken from the
    journal (left by an earlier run, or a process that died), ``deferred`` the
    cancelled and abandoned durable tasks kept in the journal for a later run, and
    ``unknown`` the journal's tasks whose name no durable task of this process has
    (found at startup; logged, and left in the journal).

    With a streaq worker: ``handed_off`` counts the remote tasks its queue in Redis
    acknowledged; from there, they are the workers' to run. ``unconfirmed`` counts
    the admitted remote tasks whose hand-off got no answer (Redis stalled, or the
    connection broke mid-way): the request failed, but Redis may have them and a
    worker may run them (never counted ``discarded``). If Redis loses its data before
    a worker took the tasks it acknowledged, ``resent`` counts those a journal handed
    off again and ``maybe_lost`` those no journal kept.

    ``deduplicated`` counts the calls that added nothing because a task with their
    id (their deduplication key) was live (see `task`), and ``cancelled_on_request``
    the ``cancelled`` tasks that `cancel_task` cancelled.
    """

    accepted: int = 0
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    abandoned: int = 0
    discarded: int = 0
    reserved: int = 0
    rejected: int = 0
    oldest_pending_age: float = 0.0
    threads_in_use: int = 0
    retrying: int = 0
    retried: int = 0
    recovered: int = 0
    deferred: int = 0
    unknown: int = 0
    handed_off: int = 0
    unconfirmed: int = 0
    resent: int = 0
    maybe_lost: int = 0
    deduplicated: int = 0
    cancelled_on_request: int = 0

    @property
    def finished(self) -> int:
        """Tasks that reached a final state."""
        return (
            self.completed
            + self.failed
            + self.timed_out
            + self.cancelled
            + self.abandoned
            + self.handed_off
        )


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What a nursery's shutdown did to every task it had accepted.

    The counts have the same names as in `TaskStats`; after a shutdown nothing is
    pending or running, so ``accepted == completed + failed + timed_out + cancelled +
    abandoned + handed_off``. ``unfinished`` names, one entry per task, the tasks the shutdown cut
    short (cancelled before or while running, or abandoned in their thread); failed
    and timed-out tasks were logged when they ended. ``duration`` is how long the
    shutdown took, in seconds of trio's clock. With a journal, ``deferred`` counts the
    cancelled and abandoned durable tasks kept in it for the next start, and
    ``recovered`` the accepted tasks that came from it. ``handed_off`` counts the
    remote tasks given to a streaq worker's queue; ``outbox``, those that were still
    waiting in the journal for Redis when the grace period ended (counted cancelled
    and deferred: they go at the next start). ``unconfirmed``, ``resent`` and
    ``maybe_lost`` are as in `TaskStats`; a report with tasks that may be lost is not
    `all_completed`. ``lease_lost`` counts the durable tasks whose rows went to another
    process while this one's lease had lapsed (it was paused, say): their runs here were
    cancelled (counted so), but for those in threads, which cannot be interrupted.
    ``unfinished_ids`` are the ids of the ``unfinished`` tasks, in the same order;
    ``deduplicated`` and ``cancelled_on_request`` are as in `TaskStats` (the tasks
    `cancel_task` cancelled were not cut short: they are not ``unfinished``, and do
    not keep a report from being `all_completed`).
    """

    accepted: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    abandoned: int
    discarded: int
    unfinished: tuple[str, ...]
    duration: float
    deferred: int = 0
    recovered: int = 0
    handed_off: int = 0
    outbox: int = 0
    unconfirmed: int = 0
    resent: int = 0
    maybe_lost: int = 0
    lease_lost: int = 0
    unfinished_ids: tuple[str, ...] = ()
    deduplicated: int = 0
    cancelled_on_request: int = 0

    @property
    def all_completed(self) -> bool:
        """True when every accepted task ran to completion, was handed off (and none
        of those Redis lost), or was cancelled by `cancel_task`."""
        done = self.completed + self.handed_off + self.cancelled_on_request
        return done == self.accepted and not self.maybe_lost

    def __str__(self) -> str:
        outcomes = [
            f"{count} {state}"
            for state, count in (
                ("completed", self.completed),
                ("failed", self.failed),
                ("timed out", self.timed_out),
                ("cancelled", self.cancelled),
                ("abandoned", self.abandoned),
                ("handed off", self.handed_off),
            )
            if count
        ]
        text = f"{self.accepted} accepted"
        if outcomes:
            text += f" ({', '.join(outcomes)})"
        for name, saying in _ALSO:
            if count := getattr(self, name):
                text += saying.format(count)
        return f"{text} in {self.duration:.3f}s"


_ALSO = (
    ("discarded", ", {} discarded"),
    ("recovered", ", {} recovered from the journal"),
    ("deferred", ", {} deferred to the next start"),
    ("outbox", " ({} remote, not yet handed to Redis)"),
    ("unconfirmed", ", {} unconfirmed by Redis (may run)"),
    ("resent", ", {} handed off again after Redis lost them"),
    ("maybe_lost", ", {} perhaps lost by Redis"),
    ("lease_lost", ", {} lost to another process (the lease lapsed)"),
    ("cancelled_on_request", ", {} of them cancelled on request"),
    ("deduplicated", ", {} duplicates added nothing"),
)
"""What a report says after its outcomes, of the counts that are not zero."""


def report_from_json(data: Mapping[str, Any]) -> ShutdownReport:
    """The `ShutdownReport` in a JSON report (``python -m trio_bg serve --report-json``),
    whose other keys (a supervisor's ``workers``, say) are left out. `KeyError` or
    `TypeError` when it is not one."""
    values = {
        field.name: data[field.name] if field.default is MISSING else data.get(field.name, 0)
        for field in fields(ShutdownReport)
    }
    return ShutdownReport(
        **values
        | {
            "unfinished": tuple(values["unfinished"]),
            "unfinished_ids": tuple(values["unfinished_ids"] or ()),
        }
    )


def names_with_counts(names: Iterable[str]) -> str:
    """Task names for a log line, each once with its count, most frequent first:
    ``"send_email (9000), resize (1000), audit"``."""
    return ", ".join(
        name if count == 1 else f"{name} ({count})" for name, count in Counter(names).most_common()
    )
