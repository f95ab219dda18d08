"""The metrics endpoint (`trio_bg.metrics.app`): a small ASGI app, mounted in an app the
middleware serves, that answers ``GET`` with the serving nursery's metrics in
Prometheus' text format (or OpenMetrics, when asked), made by ``prometheus_client``
from a collector of its own."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

try:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import choose_encoder
except ModuleNotFoundError as error:  # an optional extra
    if error.name != "prometheus_client":
        raise
    raise ImportError(
        "trio_bg.metrics needs prometheus_client: pip install 'trio-bg[prometheus]'"
    ) from error

from .._engine.recorder import TaskRecorder
from .._errors import JournalError
from .._running.nursery import BackgroundNursery, journal_of
from .._running.worker_numbers import (
    HistogramNumbers,
    Numbers,
    SharedNumbers,
    numbers_of,
    recorded,
)
from .asgi import ASGIApp, Receive, Scope, Send
from .authorization import Authorize, allowed, checked_authorize
from .task_lookup import serving_nursery

if TYPE_CHECKING:
    from .._keeping.streaq_worker import TrioWorker

JOURNAL_STATES = ("queued", "dead", "ended")
"""The journal's rows counted by ``trio_bg_journal_rows``, by its ``state`` label."""

logger = logging.getLogger("trio_bg")


@dataclass(frozen=True, slots=True)
class Reading:
    """What one scrape read: the numbers of each worker (by its number; None: the only
    process, then no ``worker`` label), and the journal's row counts (None: no journal,
    or it could not be read)."""

    workers: Mapping[str | None, Numbers]
    journal: Mapping[str, int] | None
    nursery: bool = True
    """Whether a nursery's (else a streaq worker's: its tasks and how many run)."""


class NurseryCollector:
    """A ``prometheus_client`` collector of the numbers its app read at the latest
    scrape (a registry that is read elsewhere too sees those)."""

    def __init__(self) -> None:
        self.latest: Reading | None = None

    def describe(self) -> list[Metric]:
        """Every family this collector can give, without samples: their names keep the
        registry from taking a second collector of the same names."""
        return list(_families(Reading({}, {})))

    def collect(self) -> list[Metric]:
        """The families of the latest reading (none before the first scrape)."""
        return [] if self.latest is None else list(_families(self.latest))


def app(
    *, registry: CollectorRegistry | None = None, authorize: Authorize | None = None
) -> ASGIApp:
    """An ASGI app answering ``GET`` (at any path) with the metrics of the nursery
    serving the request, in Prometheus' text format (OpenMetrics, when the scraper asks
    for it), by ``prometheus_client``.

    Mount it in an app served by `BackgroundTaskMiddleware`. Its collector goes into
    ``registry`` (a registry of its own by default: then two apps never clash;
    given one, its other metrics are served along). The nursery records its tasks'
    outcomes and times from the first scrape on: nothing before. ``authorize``, given
    each request's ASGI scope, returns a bool or an awaitable bool: False answers 403.
    Under ``python -m trio_bg serve --workers N`` each sample has a ``worker`` label,
    and the worker scraped answers for all of them.
    """
    authorize = checked_authorize(authorize)
    shared = SharedNumbers.from_environment()

    async def read() -> Reading:
        nursery = serving_nursery("trio_bg.metrics.app()")
        if shared is not None:  # (at every scrape: a worker started since sees it too)
            try:
                await trio.to_thread.run_sync(shared.want)
            except OSError as error:
                logger.warning("cannot ask the other workers for their numbers: %s", error)
        return await _read(nursery, shared)

    return _metrics_app(read, registry, authorize)


def worker_app(worker: TrioWorker, *, registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app serving the metrics of the tasks streaq ``worker`` runs (``python -m
    trio_bg worker --metrics``): their outcomes, run and wait times by name, and how
    many run now. The worker records them from now on."""
    if worker.recorder is None:
        worker.recorder = TaskRecorder()
    recorder = worker.recorder

    async def read() -> Reading:
        await trio.lowlevel.checkpoint()
        return Reading({None: recorded(recorder, running=worker.tasks_running)}, None, False)

    return _metrics_app(read, registry, None)


def _metrics_app(
    read: Callable[[], Awaitable[Reading]],
    registry: CollectorRegistry | None,
    authorize: Authorize | None,
) -> ASGIApp:
    """The app that serves, in ``registry`` (a new one for None), what ``read`` reads
    at each scrape."""
    if registry is None:
        registry = CollectorRegistry()
    elif not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, not {registry!r}")
    collector = NurseryCollector()
    registry.register(collector)  # ValueError if the registry has our names already

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # (served alone: by the worker command)
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"trio_bg.metrics.app() serves HTTP only, not {scope['type']!r}")
        if scope["method"] not in ("GET", "HEAD"):
            await _refuse(send, 405, b"method not allowed\n", allow=b"GET, HEAD")
            return
        if not await allowed(authorize, scope):
            await _refuse(send, 403, b"forbidden\n")
            return
        # Read, then encoded with no await between: a concurrent scrape cannot swap it.
        collector.latest = await read()
        accept = b",".join(value for name, value in scope["headers"] if name.lower() == b"accept")
        encode, content_type = choose_encoder(accept.decode("latin-1"))
        body = encode(registry)
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    return metrics_app


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        kind = (await receive())["type"].removeprefix("lifespan.")
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def _read(nursery: BackgroundNursery, shared: SharedNumbers | None) -> Reading:
    """The numbers of ``nursery`` (and of the other workers sharing them), and the
    journal's row counts."""
    own = numbers_of(nursery)
    workers: dict[str | None, Numbers] = {None: own}
    if shared is not None:
        every: dict[str, Numbers] = await trio.to_thread.run_sync(shared.others)
        every[shared.worker] = own
        workers = {worker: every[worker] for worker in sorted(every, key=_worker_order)}
    journal_counts = None
    if (journal := journal_of(nursery)) is not None:
        try:
            journal_counts = await journal.counts()
        except JournalError as error:
            logger.warning("the metrics leave out the journal's rows: %s", error)
    return Reading(workers, journal_counts)


def _worker_order(worker: str) -> tuple[int, str]:
    return (int(worker), "") if worker.isdigit() else (0, worker)


def _families(reading: Reading) -> Iterator[Metric]:
    """The metric families of ``reading`` (see docs/metrics.md for each)."""
    workers = reading.workers
    by = ["worker"] if any(worker is not None for worker in workers) else []

    def labels(worker: str | None, *values: str) -> list[str]:
        return [worker, *values] if worker is not None else list(values)

    tasks = CounterMetricFamily(
        "trio_bg_tasks",
        "Background tasks that ended, by task name and outcome (since the first scrape).",
        labels=[*by, "name", "outcome"],
    )
    durations = HistogramMetricFamily(
        "trio_bg_task_duration_seconds",
        "Run time of a background task's last attempt, by task name.",
        labels=[*by, "name"],
    )
    waits = HistogramMetricFamily(
        "trio_bg_task_wait_seconds",
        "Time a background task waited for a running slot (each attempt), by task name.",
        labels=[*by, "name"],
    )
    for worker, numbers in workers.items():
        for name, outcomes in numbers.outcomes.items():
            for outcome, count in outcomes.items():
                tasks.add_metric(labels(worker, name, outcome), count)
        for family, histograms in ((durations, numbers.durations), (waits, numbers.waits)):
            for name, histogram in histograms.items():
                family.add_metric(labels(worker, name), _buckets(histogram), histogram.total)
    yield from (tasks, durations, waits)

    for name, help_text, value in _GAUGES if reading.nursery else _GAUGES[:1]:
        gauge = GaugeMetricFamily(name, help_text, labels=by)
        for worker, numbers in workers.items():
            gauge.add_metric(labels(worker), value(numbers))
        yield gauge
    for name, help_text, value in _TOTALS if reading.nursery else ():
        counter = CounterMetricFamily(name, help_text, labels=by)
        for worker, numbers in workers.items():
            counter.add_metric(labels(worker), value(numbers))
        yield counter

    if reading.journal is not None:
        rows = GaugeMetricFamily(
            "trio_bg_journal_rows",
            "Rows in the journal of durable tasks, by state: queued (to run, or to hand "
            "off), dead (dead letters), ended (statuses kept).",
            labels=["state"],
        )
        for state in JOURNAL_STATES:
            rows.add_metric([state], reading.journal.get(state, 0))
        yield rows
        yield GaugeMetricFamily(
            "trio_bg_outbox_rows",
            "Queued journal rows of remote tasks that Redis does not have yet.",
            value=reading.journal.get("outbox", 0),
        )


_GAUGES: tuple[tuple[str, str, Callable[[Numbers], float]], ...] = (
    ("trio_bg_tasks_running", "Background tasks running now.", lambda n: n.running),
    (
        "trio_bg_tasks_pending",
        "Background tasks waiting to run: for a slot, a worker thread or a retry.",
        lambda n: n.pending,
    ),
    (
        "trio_bg_threads_in_use",
        "Worker threads running plain-function tasks now.",
        lambda n: n.threads_in_use,
    ),
    (
        "trio_bg_oldest_pending_task_age_seconds",
        "How long the oldest pending background task has waited (0: none waits).",
        lambda n: n.oldest_pending_age,
    ),
)

_TOTALS: tuple[tuple[str, str, Callable[[Numbers], float]], ...] = (
    (
        "trio_bg_tasks_rejected",
        "add_task calls refused with Overloaded: the nursery was full (since it opened).",
        lambda n: n.rejected,
    ),
    (
        "trio_bg_tasks_discarded",
        "Tasks never run because their request's response never completed (since it opened).",
        lambda n: n.discarded,
    ),
    (
        "trio_bg_task_retries",
        "Retries scheduled after a failed or timed-out attempt (since it opened).",
        lambda n: n.retried,
    ),
)


def _buckets(histogram: HistogramNumbers) -> list[tuple[str, float]]:
    return [
        ("+Inf" if math.isinf(bound) else repr(bound), count)  # as prometheus_client has them
        for bound, count in histogram.cumulative()
    ]


async def _refuse(send: Send, status: int, body: bytes, *, allow: bytes = b"") -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if allow:
        headers.append((b"allow", allow))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
