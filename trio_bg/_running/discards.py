"""Admitted tasks that will never run here: those of a request that failed before its
response completed (discarded), the remote ones Redis had taken already (handed off)
or may have (unconfirmed), and the durable ones another process stored first
(duplicates). Each is counted, its status kept, and whoever waits for it told."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .._engine.report import names_with_counts
from .._engine.status import TaskState
from .._engine.tasks import Task, sent

if TYPE_CHECKING:
    from .runner import TaskRunner

logger = logging.getLogger("trio_bg")


def discard_unrun(runner: TaskRunner, tasks: Sequence[Task], reason: str) -> None:
    """Release ``tasks``, admitted but never to run here because of ``reason``; count
    and log them (in trio's thread)."""
    for task in tasks:
        if task.duplicate:
            drop_duplicate(runner, task, pass_on=False)  # (those after it are here too)
    tasks = [task for task in tasks if not task.duplicate]
    if handed := [task for task in tasks if sent(task)]:
        # Redis had them before the response failed: they are the workers' now.
        logger.warning(
            "%d remote task(s) had been handed off already (%s): %s",
            len(handed),
            reason,
            ", ".join(task.name for task in handed),
        )
        observed = runner.onlookers.observed()
        for task in handed:
            runner.count_accepted(task, observed)
            runner.end(task, "handed_off")
        tasks = [task for task in tasks if not sent(task)]
    books = runner.books
    if in_doubt := [task for task in tasks if task.remote is not None and task.remote.in_doubt]:
        logger.warning(
            "%d remote task(s) got no answer from Redis (%s); Redis may have them and "
            "a worker may run them, so they count as unconfirmed: %s",
            len(in_doubt),
            reason,
            names_with_counts(task.name for task in in_doubt),
        )
        books.released += len(in_doubt)
        books.unconfirmed += len(in_doubt)
        _tell_ended(runner, in_doubt, "handed_off", f"unconfirmed: {reason}")
        tasks = [task for task in tasks if task.remote is None or not task.remote.in_doubt]
    if tasks:
        books.released += len(tasks)
        books.discarded += len(tasks)
        _tell_ended(runner, tasks, "cancelled", f"discarded: {reason}")
        if runner.journal is not None:
            runner.journal.discarded(tasks)
        logger.warning(
            "discarded %d background task(s) (%s): %s",
            len(tasks),
            reason,
            ", ".join(task.name for task in tasks),
        )
    books.tell_idle()


def drop_duplicate(runner: TaskRunner, task: Task, *, pass_on: bool) -> None:
    """The journal (or Redis) had ``task``'s id already (another process added the same
    keyed task first): it does not run here, and is counted deduplicated. With
    ``pass_on``, an ordered request's next task takes its turn now."""
    with runner.admission_lock:  # (admissions count duplicates too, in worker threads)
        runner.books.deduplicated += 1
    runner.books.released += 1
    runner.statuses.release(task)
    if task.ends is not None:
        task.ends.ended()
    then, task.then = task.then, None
    if pass_on and then is not None:
        runner.accept((then,))
    runner.books.tell_idle()


def _tell_ended(runner: TaskRunner, tasks: Iterable[Task], state: TaskState, why: str) -> None:
    """Keep the statuses of ``tasks``, which never ran, and tell whoever waits for
    them to end (see `TaskEnds`) that they did."""
    for task in tasks:
        runner.statuses.ended(task, state, why)
        if task.ends is not None:
            task.ends.ended()
