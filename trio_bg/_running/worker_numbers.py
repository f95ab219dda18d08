"""A nursery's numbers, as the metrics show them (per task name: the outcome counts and
the run and wait time histograms; the live counts; a few totals), and their sharing
between the worker processes of ``python -m trio_bg serve --workers N``.

The supervisor gives its workers a directory (`DIRECTORY_VARIABLE`) and each its number
(`WORKER_VARIABLE`). A worker whose metrics are scraped marks the directory `wanted`;
from then on every worker records its tasks and writes its numbers there every
`SHARE_EVERY` seconds, and the worker scraped reads the others' (see `SharedNumbers`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .._engine.recorder import BUCKETS, Histogram, TaskRecorder, cumulative
from .nursery import BackgroundNursery, record_tasks

DIRECTORY_VARIABLE = "TRIO_BG_WORKER_NUMBERS"
"""The environment variable naming the directory where the workers of ``serve
--workers N`` share their numbers (set by the supervisor, for its workers only)."""

WORKER_VARIABLE = "TRIO_BG_WORKER"
"""The environment variable holding a worker's number, 1 to N: a replacement takes the
number of the worker it replaces, so the ``worker`` label stays bounded."""

SHARE_EVERY = 1.0
"""Seconds between two writes of a worker's numbers, once they are wanted."""

STALE_AFTER = 10.0
"""Seconds after which a worker's numbers are left out: the worker died (its
replacement writes its own soon) or is stuck."""

WANTED = "wanted"
"""The file that marks the directory: a worker's metrics were scraped."""

logger = logging.getLogger("trio_bg")


@dataclass(frozen=True, slots=True)
class HistogramNumbers:
    """A histogram: the observations in each of `BUCKETS` (not cumulative), their sum."""

    counts: tuple[int, ...]
    total: float

    @classmethod
    def of(cls, histogram: Histogram) -> HistogramNumbers:
        """The numbers of a recorder's ``histogram``."""
        return cls(tuple(histogram.counts), histogram.total)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), as Prometheus' buckets count."""
        return cumulative(self.counts)


@dataclass(frozen=True, slots=True)
class Numbers:
    """What the metrics show of one nursery. ``outcomes``, ``durations`` and ``waits``
    are by task name, counted since its recorder was made (`record_tasks`); the
    totals (``rejected``, ``discarded``, ``retried``) since the nursery opened."""

    outcomes: dict[str, dict[str, int]]
    durations: dict[str, HistogramNumbers]
    waits: dict[str, HistogramNumbers]
    running: int
    pending: int
    threads_in_use: int
    oldest_pending_age: float
    rejected: int
    discarded: int
    retried: int

    def as_json(self) -> dict[str, Any]:
        """These numbers as JSON-ready values (`from_json` reads them back)."""
        return {
            "outcomes": self.outcomes,
            "durations": {name: [h.counts, h.total] for name, h in self.durations.items()},
            "waits": {name: [h.counts, h.total] for name, h in self.waits.items()},
            "gauges": [self.running, self.pending, self.threads_in_use, self.oldest_pending_age],
            "totals": [self.rejected, self.discarded, self.retried],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Numbers:
        """The numbers `as_json` gave; `ValueError`, `KeyError` or `TypeError` for
        anything else."""

        def histograms(values: Mapping[str, Any]) -> dict[str, HistogramNumbers]:
            found = {}
            for name, (counts, total) in values.items():
                if len(counts) != len(BUCKETS):
                    raise ValueError(f"{len(counts)} buckets, not {len(BUCKETS)}")
                found[str(name)] = HistogramNumbers(tuple(int(c) for c in counts), float(total))
            return found

        running, pending, threads_in_use, oldest = data["gauges"]
        rejected, discarded, retried = data["totals"]
        return cls(
            outcomes={
                str(name): {str(outcome): int(count) for outcome, count in counts.items()}
                for name, counts in data["outcomes"].items()
            },
            durations=histograms(data["durations"]),
            waits=histograms(data["waits"]),
            running=int(running),
            pending=int(pending),
            threads_in_use=int(threads_in_use),
            oldest_pending_age=float(oldest),
            rejected=int(rejected),
            discarded=int(discarded),
            retried=int(retried),
        )


def numbers_of(nursery: BackgroundNursery) -> Numbers:
    """``nursery``'s numbers now; its recorder is made if it has none (then it starts
    recording). In trio's thread."""
    stats = nursery.stats
    return recorded(
        record_tasks(nursery),
        running=stats.running,
        pending=stats.pending,
        threads_in_use=stats.threads_in_use,
        oldest_pending_age=stats.oldest_pending_age,
        rejected=stats.rejected,
        discarded=stats.discarded,
        retried=stats.retried,
    )


def recorded(
    recorder: TaskRecorder,
    *,
    running: int,
    pending: int = 0,
    threads_in_use: int = 0,
    oldest_pending_age: float = 0.0,
    rejected: int = 0,
    discarded: int = 0,
    retried: int = 0,
) -> Numbers:
    """The numbers ``recorder`` holds, with the live counts and totals given (a streaq
    worker has only ``running``)."""
    records = recorder.by_name.items()
    return Numbers(
        outcomes={name: dict(record.outcomes) for name, record in records if record.outcomes},
        durations={
            name: HistogramNumbers.of(record.durations)
            for name, record in records
            if record.durations.recent
        },
        waits={
            name: HistogramNumbers.of(record.waits)
            for name, record in records
            if record.waits.recent
        },
        running=running,
        pending=pending,
        threads_in_use=threads_in_use,
        oldest_pending_age=oldest_pending_age,
        rejected=rejected,
        discarded=discarded,
        retried=retried,
    )


class SharedNumbers:
    """The directory where the workers of ``serve --workers N`` share their numbers,
    seen from worker ``worker``: one file per worker, written whole (a new file renamed
    over the old), so a reader never sees half of one."""

    __slots__ = ("directory", "worker")

    def __init__(self, directory: Path, worker: str) -> None:
        self.directory = directory
        self.worker = worker

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SharedNumbers | None:
        """The directory the supervisor gave this worker; None when not a worker of
        ``serve --workers N``."""
        directory, worker = environ.get(DIRECTORY_VARIABLE), environ.get(WORKER_VARIABLE)
        if not directory or not worker:
            return None
        return cls(Path(directory), worker)

    def want(self) -> None:
        """Ask every worker for its numbers (by the `WANTED` mark)."""
        (self.directory / WANTED).touch()

    def wanted(self) -> bool:
        """Whether any worker asked for the numbers."""
        return (self.directory / WANTED).exists()

    def write(self, numbers: Numbers) -> None:
        """Write this worker's ``numbers``."""
        data = {"written": time.time(), "pid": os.getpid(), "numbers": numbers.as_json()}
        path = self._path(self.worker)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data), encoding="utf-8")
        partial.replace(path)

    def others(self) -> dict[str, Numbers]:
        """The other workers' numbers, by worker number: those written in the last
        `STALE_AFTER` seconds (a file that cannot be read is logged and left out)."""
        found = {}
        now = time.time()
        for path in sorted(self.directory.glob("numbers-*.json")):
            worker = path.stem.removeprefix("numbers-")
            if worker == self.worker:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if now - float(data["written"]) > STALE_AFTER:
                    continue
                found[worker] = Numbers.from_json(data["numbers"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.warning("cannot read worker %s's numbers (%s): left out", worker, error)
        return found

    def _path(self, worker: str) -> Path:
        return self.directory / f"numbers-{worker}.json"


async def share_numbers(nursery_of: Callable[[], BackgroundNursery], shared: SharedNumbers) -> None:
    """Write the numbers of the nursery ``nursery_of()`` gives (`RuntimeError` until
    it opened) every `SHARE_EVERY` seconds once `SharedNumbers.wanted`, until
    cancelled. Never raises: a failure (a full disk, say) is logged when it starts,
    and the next second tries again."""
    recording = failing = False
    while True:
        await trio.sleep(SHARE_EVERY)
        try:
            nursery = nursery_of()
        except RuntimeError:
            continue  # the app's lifespan has not started it yet
        try:
            if not recording:
                recording = await trio.to_thread.run_sync(shared.wanted)
                if not recording:
                    continue
            await trio.to_thread.run_sync(shared.write, numbers_of(nursery))
        except Exception:
            if not failing:
                logger.exception(
                    "worker %s cannot share its numbers for the metrics (trying again every %gs)",
                    shared.worker,
                    SHARE_EVERY,
                )
            failing = True
        else:
            failing = False
