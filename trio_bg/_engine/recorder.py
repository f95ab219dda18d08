"""What the dashboard and the metrics read of a nursery's past: per task name, the count
of each outcome, histograms of run and wait times (and the latest of them, for
percentiles), and the outcomes of the last minutes in a timeline. Nothing is recorded
until a dashboard or metrics app asks for a nursery's recorder (`record_tasks`)."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from typing import Any

from .events import Outcome

BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    math.inf,
)
"""The upper bounds (seconds) of the run and wait time histograms: Prometheus' default
buckets, and longer ones for background work."""

RECENT = 1_000
"""The latest run and wait times kept per name, for percentiles."""

TIMELINE_STEP = 5.0
"""Seconds per point of the outcome timeline."""

TIMELINE_POINTS = 120
"""Points in the outcome timeline: ten minutes of them."""


def cumulative(counts: Sequence[int]) -> list[tuple[float, int]]:
    """Per-bucket ``counts`` (one for each of `BUCKETS`) as (upper bound, observations
    at most that), as Prometheus' buckets count."""
    running = 0
    buckets = []
    for bound, count in zip(BUCKETS, counts, strict=True):
        running += count
        buckets.append((bound, running))
    return buckets


class Histogram:
    """Observations counted in `BUCKETS` (not cumulative: a count per bucket), their
    sum, and the latest `RECENT` of them."""

    __slots__ = ("counts", "recent", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT)

    def observe(self, seconds: float) -> None:
        """Count one observation of ``seconds``."""
        seconds = max(0.0, seconds)
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.recent.append(seconds)

    @property
    def count(self) -> int:
        """How many observations were counted."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), as Prometheus' buckets count."""
        return cumulative(self.counts)

    def percentiles(self, *fractions: float) -> list[float | None]:
        """The percentiles (0 to 1) of the latest observations; None for none."""
        latest = sorted(self.recent)
        if not latest:
            return [None for _ in fractions]
        return [latest[min(len(latest) - 1, int(f * len(latest)))] for f in fractions]


class NameRecord:
    """What was recorded of the tasks of one name."""

    __slots__ = ("durations", "outcomes", "waits")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.durations = Histogram()
        self.waits = Histogram()


class TaskRecorder:
    """The record of a nursery's tasks, since it was made (see the module). Written in
    trio's thread, by the nursery's onlookers; read by the dashboard and the metrics."""

    __slots__ = ("by_name", "since", "timeline")

    def __init__(self) -> None:
        self.since = time.time()
        self.by_name: dict[str, NameRecord] = {}
        # (start of a TIMELINE_STEP, wall clock; outcome counts in it), oldest first.
        self.timeline: deque[tuple[float, dict[str, int]]] = deque(maxlen=TIMELINE_POINTS)

    def started(self, name: str, waited: float | None) -> None:
        """A task of ``name`` started its run after waiting ``waited`` seconds for it."""
        if waited is not None:
            self._record(name).waits.observe(waited)

    def finished(self, name: str, outcome: Outcome, duration: float | None) -> None:
        """A task of ``name`` ended with ``outcome``, its run having taken ``duration``
        seconds (None: it never ran)."""
        record = self._record(name)
        record.outcomes[outcome] = record.outcomes.get(outcome, 0) + 1
        if duration is not None:
            record.durations.observe(duration)
        step = time.time() // TIMELINE_STEP * TIMELINE_STEP
        timeline = self.timeline
        if not timeline or timeline[-1][0] != step:
            timeline.append((step, {}))
        counts = timeline[-1][1]
        counts[outcome] = counts.get(outcome, 0) + 1

    def _record(self, name: str) -> NameRecord:
        record = self.by_name.get(name)
        if record is None:
            record = self.by_name[name] = NameRecord()
        return record

    def snapshot(self) -> dict[str, Any]:
        """What was recorded, as JSON-ready values: per name, the outcome counts and
        the histograms (per-bucket counts, sum, p50/p95/p99 of the latest); and the
        timeline, one point per `TIMELINE_STEP` seconds with its outcome counts."""
        return {
            "since": self.since,
            "buckets": [bound if math.isfinite(bound) else "+Inf" for bound in BUCKETS],
            "names": {
                name: {
                    "outcomes": dict(record.outcomes),
                    "durations": _histogram(record.durations),
                    "waits": _histogram(record.waits),
                }
                for name, record in sorted(self.by_name.items())
            },
            "timeline": [{"at": at, "outcomes": dict(counts)} for at, counts in self.timeline],
        }


def _histogram(histogram: Histogram) -> dict[str, Any]:
    p50, p95, p99 = histogram.percentiles(0.5, 0.95, 0.99)
    return {
        "counts": list(histogram.counts),
        "sum": histogram.total,
        "p50": p50,
        "p95": p95,
        "p99": p99,
    }
