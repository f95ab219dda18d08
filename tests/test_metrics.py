"""trio_bg.metrics.app: the serving nursery's metrics in Prometheus' format, read by
prometheus_client's own parser, checked against the nursery's `stats` (under load, on
a real Hypercorn), in virtual time for the histograms, and with a journal."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import prometheus_client
import pytest
import trio
import trio.testing
from conftest import asgi_client, run_lifespan, served
from prometheus_client.parser import text_string_to_metric_families

import trio_bg
import trio_bg.metrics
from trio_bg._running.nursery import journal_of
from trio_bg._web.asgi import ASGIApp, Receive, Scope, Send

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (sample name, labels), as Prometheus would read it."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[metric, frozenset(labels.items())]


def total(samples: Samples, metric: str, /, **labels: str) -> float:
    """The sum of ``metric``'s samples that have ``labels`` (among others)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= ls)


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> Samples:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


# -- the app: /metrics (the metrics app), anything else adds the tasks its query names --


async def sends_mail(number: int) -> None:
    await trio.lowlevel.checkpoint()


async def fails(number: int) -> None:
    raise ValueError(f"task {number} fails")


def writes_file(number: int) -> None:
    """A plain function: it runs in a worker thread."""


class Gate:
    """Tasks that wait for the test to open the gate: async ones, and one in a thread."""

    def __init__(self) -> None:
        self.opened = trio.Event()
        self.thread_gate = threading.Event()
        self.thread_entered = threading.Event()
        self.waiting = 0

    async def held(self) -> None:
        self.waiting += 1
        await self.opened.wait()

    def held_in_a_thread(self) -> None:
        self.thread_entered.set()
        self.thread_gate.wait(timeout=30)

    def open(self) -> None:
        self.opened.set()
        self.thread_gate.set()


async def sleeps(seconds: float) -> None:
    await trio.sleep(seconds)


def routed(
    metrics: ASGIApp, gate: Gate | None = None, *, strip_prefix: bool = True, **options: object
) -> trio_bg.BackgroundTaskMiddleware:
    """``/metrics`` goes to ``metrics``, mounted as a server would (the prefix moved into
    root_path) or as Starlette's Mount does (kept); ``/add?N`` adds N's tasks: always
    sends_mail, every 4th fails, every 5th writes_file; ``/hold``, ``/hold-thread`` and
    ``/sleep?S`` add the gate's and a sleeper."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, query = scope["path"], scope["query_string"].decode()
        if path.startswith("/metrics"):
            mounted = dict(scope, root_path="/metrics")
            if strip_prefix:
                mounted["path"] = path[len("/metrics") :] or "/"
            await metrics(mounted, receive, send)
            return
        tasks = trio_bg.current_tasks()
        if path == "/add":
            number = int(query)
            tasks.add_task(sends_mail, number)
            if number % 4 == 0:
                tasks.add_task(fails, number)
            if number % 5 == 0:
                tasks.add_task(writes_file, number)
        elif path == "/hold" and gate is not None:
            tasks.add_task(gate.held)
        elif path == "/hold-thread" and gate is not None:
            tasks.add_task(gate.held_in_a_thread)
        elif path == "/sleep":
            tasks.add_task(sleeps, float(query))
        elif path == "/durable":
            tasks.add_task(durable_fails if query == "fails" else durable_passes)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return trio_bg.BackgroundTaskMiddleware(app, grace_period=0, **options)  # type: ignore[arg-type]


@trio_bg.task(name="tests.metrics.durable_fails", durable=True)
async def durable_fails() -> None:
    raise ValueError("a dead letter")


@trio_bg.task(name="tests.metrics.durable_passes", durable=True)
async def durable_passes() -> None:
    pass


SENDS_MAIL, FAILS, WRITES_FILE = "sends_mail", "fails", "writes_file"  # their qualified names
DURABLE_FAILS = "tests.metrics.durable_fails"

CLIENTS = 8
REQUESTS_EACH = 25


async def test_a_scrape_under_load_counts_what_stats_counts() -> None:
    """Eight clients add tasks (some fail, some run in threads) while another scrapes
    all along, on a real Hypercorn: each scrape parses, no counter goes down, and once
    the tasks are done the counts are the nursery's `stats`, by name and outcome."""
    middleware = routed(trio_bg.metrics.app())
    async with served(middleware) as client:
        first = await scrape(client)  # the recording starts here: no task yet
        assert total(first, "trio_bg_tasks_total") == 0
        assert value(first, "trio_bg_tasks_running") == 0
        loading = True
        during: list[Samples] = []

        async def scrape_all_along() -> None:
            while loading:
                during.append(await scrape(client))

        async def load(offset: int) -> None:
            for number in range(offset, offset + REQUESTS_EACH):
                assert (await client.get(f"/add?{number}")).status_code == 200

        async with trio.open_nursery() as scraper:
            scraper.start_soon(scrape_all_along)
            async with trio.open_nursery() as clients:
                for start in range(CLIENTS):
                    clients.start_soon(load, start * REQUESTS_EACH)
            loading = False
        await middleware.nursery.wait_idle()
        last = await scrape(client)
        stats = middleware.nursery.stats
        head = await client.head("/metrics")
        assert (head.status_code, head.content) == (200, b"")

    requests = CLIENTS * REQUESTS_EACH
    assert (stats.completed, stats.failed) == (requests + requests // 5, requests // 4)
    assert total(last, "trio_bg_tasks_total", outcome="completed") == stats.completed
    assert total(last, "trio_bg_tasks_total", outcome="failed") == stats.failed
    assert total(last, "trio_bg_tasks_total") == stats.finished
    expected = {
        (SENDS_MAIL, "completed"): requests,
        (FAILS, "failed"): requests // 4,
        (WRITES_FILE, "completed"): requests // 5,
    }
    tasks_total = {
        (dict(labels)["name"], dict(labels)["outcome"]): count
        for (name, labels), count in last.items()
        if name == "trio_bg_tasks_total"
    }
    assert tasks_total == expected
    for (name, _), count in expected.items():  # one run each, so one duration and one wait
        for histogram in ("trio_bg_task_duration_seconds", "trio_bg_task_wait_seconds"):
            assert value(last, f"{histogram}_count", name=name) == count
            assert value(last, f"{histogram}_bucket", name=name, le="+Inf") == count
    for gauge, now in [
        ("trio_bg_tasks_running", stats.running),
        ("trio_bg_tasks_pending", stats.pending),
        ("trio_bg_threads_in_use", stats.threads_in_use),
        ("trio_bg_tasks_rejected_total", stats.rejected),
        ("trio_bg_tasks_discarded_total", stats.discarded),
    ]:
        assert value(last, gauge) == now == 0
    assert not any(name.startswith("trio_bg_journal") for name, _ in last)  # no journal

    # Scrapes taken during the load: no counter ever went down.
    assert during, "no scrape was taken during the load"
    for earlier, later in zip([first, *during], [*during, last], strict=True):
        for key, seen in earlier.items():
            if key[0] == "trio_bg_tasks_total":
                assert seen <= later[key]


async def test_the_gauges_are_the_nursery_stats_of_the_moment() -> None:
    """Two async tasks and a thread task hold their slots (``max_running=3``), two more
    wait: a scrape says so, as `stats` does; once they ran, both say zero."""
    gate = Gate()
    middleware = routed(trio_bg.metrics.app(), gate, max_running=3)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        await scrape(client)  # the recording starts: these tasks' ends are counted
        await client.get("/hold")
        await client.get("/hold")
        await client.get("/hold-thread")
        await client.get("/add?1")
        await client.get("/sleep?0")
        with trio.fail_after(10):
            await trio.to_thread.run_sync(gate.thread_entered.wait)
            # The thread's start reaches trio's thread a moment later, with no event.
            while middleware.nursery.stats.threads_in_use < 1 or gate.waiting < 2:  # noqa: ASYNC110
                await trio.sleep(0.001)
        busy = await scrape(client)
        stats = middleware.nursery.stats
        assert (stats.running, stats.pending, stats.threads_in_use) == (3, 2, 1)
        assert value(busy, "trio_bg_tasks_running") == stats.running
        assert value(busy, "trio_bg_tasks_pending") == stats.pending
        assert value(busy, "trio_bg_threads_in_use") == stats.threads_in_use
        assert value(busy, "trio_bg_oldest_pending_task_age_seconds") > 0
        gate.open()
        await middleware.nursery.wait_idle()
        idle = await scrape(client)
    assert [
        value(idle, name)
        for name in ("trio_bg_tasks_running", "trio_bg_tasks_pending", "trio_bg_threads_in_use")
    ] == [0, 0, 0]
    assert value(idle, "trio_bg_oldest_pending_task_age_seconds") == 0
    assert value(idle, "trio_bg_tasks_total", name="Gate.held", outcome="completed")
    assert total(idle, "trio_bg_tasks_total") == 5 == middleware.nursery.stats.completed


@pytest.mark.parametrize("strip_prefix", [True, False])
async def test_run_and_wait_times_fall_in_their_buckets(
    autojump_clock: trio.abc.Clock, strip_prefix: bool
) -> None:
    """In virtual time, with one slot: a 0.3 s task, then a 2 s one that waited for it,
    then a 0.003 s one that waited for both."""
    middleware = routed(trio_bg.metrics.app(), strip_prefix=strip_prefix, max_running=1)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        await scrape(client)
        for seconds in ("0.3", "2", "0.003"):
            await client.get(f"/sleep?{seconds}")
        await middleware.nursery.wait_idle()
        samples = await scrape(client, "/metrics/")
    name = "sleeps"
    durations = {
        dict(labels)["le"]: count
        for (sample, labels), count in samples.items()
        if sample == "trio_bg_task_duration_seconds_bucket"
    }
    assert list(durations) == [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0",
        "30.0", "60.0", "300.0", "+Inf",
    ]  # fmt: skip
    assert [durations[le] for le in ("0.005", "0.25", "0.5", "1.0", "2.5", "+Inf")] == [
        1, 1, 2, 2, 3, 3,
    ]  # fmt: skip
    assert value(samples, "trio_bg_task_duration_seconds_sum", name=name) == pytest.approx(2.303)
    waits = {
        dict(labels)["le"]: count
        for (sample, labels), count in samples.items()
        if sample == "trio_bg_task_wait_seconds_bucket"
    }
    # Waited 0, 0.3 and 2.3 seconds.
    assert [waits[le] for le in ("0.005", "0.25", "0.5", "2.5", "+Inf")] == [1, 1, 2, 3, 3]
    assert value(samples, "trio_bg_task_wait_seconds_sum", name=name) == pytest.approx(2.6)


async def test_nothing_is_recorded_before_the_first_scrape() -> None:
    middleware = routed(trio_bg.metrics.app())
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        await client.get("/add?1")
        await middleware.nursery.wait_idle()
        first = await scrape(client)
        assert middleware.nursery.stats.completed == 1
        assert total(first, "trio_bg_tasks_total") == 0  # it ran before anyone asked
        await client.get("/add?1")
        await middleware.nursery.wait_idle()
        second = await scrape(client)
    assert value(second, "trio_bg_tasks_total", name=SENDS_MAIL, outcome="completed") == 1


async def test_the_journal_rows_by_state_and_the_outbox(tmp_path: Path) -> None:
    """One slot, held: a durable task queues in the journal; let go, it fails and stays
    as a dead letter. The rows are those the journal counts."""
    gate = Gate()
    journal = tmp_path / "tasks.db"
    middleware = routed(trio_bg.metrics.app(), gate, max_running=1, journal=journal)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        await client.get("/hold")
        await client.get("/durable?fails")
        queued = await scrape(client)
        assert value(queued, "trio_bg_journal_rows", state="queued") == 1
        assert value(queued, "trio_bg_journal_rows", state="dead") == 0
        gate.open()
        await middleware.nursery.wait_idle()
        dead = await scrape(client)
        kept = journal_of(middleware.nursery)
        assert kept is not None
        counts = await kept.counts()
    assert counts["dead"] == 1
    for state in ("queued", "dead", "ended"):
        assert value(dead, "trio_bg_journal_rows", state=state) == counts[state]
    assert value(dead, "trio_bg_outbox_rows") == counts["outbox"] == 0
    assert value(dead, "trio_bg_tasks_total", name=DURABLE_FAILS, outcome="failed") == 1


async def test_each_app_has_a_registry_of_its_own_unless_given_one() -> None:
    """Two apps never clash; a registry given serves its other metrics along, and
    refuses a second app (its names are taken)."""
    trio_bg.metrics.app()
    trio_bg.metrics.app()
    registry = prometheus_client.CollectorRegistry()
    requests = prometheus_client.Counter("shop_requests", "Requests.", registry=registry)
    requests.inc(3)
    middleware = routed(trio_bg.metrics.app(registry=registry))
    with pytest.raises(ValueError, match="trio_bg_tasks"):
        trio_bg.metrics.app(registry=registry)
    with pytest.raises(TypeError, match="CollectorRegistry"):
        trio_bg.metrics.app(registry=prometheus_client.REGISTRY.__class__)  # type: ignore[arg-type]
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        samples = await scrape(client)
    assert value(samples, "shop_requests_total") == 3
    assert value(samples, "trio_bg_tasks_running") == 0


async def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    middleware = routed(trio_bg.metrics.app())
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        response = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert "# TYPE trio_bg_tasks counter" in response.text
    assert response.text.endswith("# EOF\n")


async def _allow_async(scope: Scope) -> bool:
    await trio.lowlevel.checkpoint()
    return dict(scope["headers"]).get(b"authorization") == b"Bearer ok"


def _allow_sync(scope: Scope) -> bool:
    return dict(scope["headers"]).get(b"authorization") == b"Bearer ok"


@pytest.mark.parametrize("authorize", [_allow_sync, _allow_async])
async def test_authorize_guards_it_and_only_get_is_allowed(
    authorize: Callable[[Scope], bool | Awaitable[bool]],
) -> None:
    middleware = routed(trio_bg.metrics.app(authorize=authorize))
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        assert (await client.get("/metrics")).status_code == 403
        ok = {"authorization": "Bearer ok"}
        assert (await client.get("/metrics", headers=ok)).status_code == 200
        post = await client.post("/metrics", headers=ok)
        assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
    with pytest.raises(TypeError, match="callable"):
        trio_bg.metrics.app(authorize=True)  # type: ignore[arg-type]


async def test_outside_the_middleware_it_says_where_to_mount_it() -> None:
    async with asgi_client(trio_bg.metrics.app()) as client:
        with pytest.raises(RuntimeError, match="BackgroundTaskMiddleware"):
            await client.get("/")
