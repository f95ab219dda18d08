"""10. The metrics' cost: the HTTP overhead benchmark's app (middleware, one no-op task per
request) with `trio_bg.metrics.app` mounted and scraped every second, against the same
app without it.

Each rep serves both, one after the other (the order rotated from rep to rep), each in a
fresh server under the same load. The scrapes come from a thread of this process, over
a connection of their own, once at the start of the load (the recording starts there)
and then every `SCRAPE_EVERY` seconds; each must answer 200 with the task counter.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from .apps.metrics_app import METRICS_PATH
from .bench_http import App, HttpSettings, Matrix, Measurement, _settle
from .load import LoadError
from .section import Section, Table, median, verdict
from .server import Server, ServerError

TARGET = 0.97
"""Scraped every second, the app keeps at least this share of its req/s."""

SCRAPE_EVERY = 1.0
SCRAPE_TIMEOUT = 5.0

WITHOUT = App("metrics", "noop", "middleware + 1 no-op task, no metrics app")
WITH = App("metrics", "noop", "+ trio_bg.metrics.app, scraped every second")
TARGETS = {
    WITHOUT: "benchmarks.apps.metrics_app:build(False)",
    WITH: "benchmarks.apps.metrics_app:build(True)",
}


@dataclass
class Scraper:
    """Scrape ``port``'s metrics at once, then every `SCRAPE_EVERY` seconds, in a thread,
    until the block ends; the latency of each scrape, and what went wrong."""

    port: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(SCRAPE_TIMEOUT + 1)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=SCRAPE_TIMEOUT)
        with contextlib.closing(connection):
            while True:
                started = time.perf_counter()
                try:
                    connection.request("GET", METRICS_PATH)
                    response = connection.getresponse()
                    body = response.read()
                    if response.status != 200 or b"trio_bg_tasks_running" not in body:
                        self.errors.append(f"scrape answered {response.status}")
                except (OSError, http.client.HTTPException) as error:
                    self.errors.append(f"scrape failed: {error}")
                    connection.close()
                self.latencies.append(time.perf_counter() - started)
                if self._stop.wait(SCRAPE_EVERY):
                    return


def measure(app: App, rep: int, settings: HttpSettings) -> tuple[Measurement, list[float]]:
    """One run of ``app``: the measurement and, with the metrics app, the scrapes' latencies."""
    result = Measurement(app, rep)
    latencies: list[float] = []
    try:
        with Server(TARGETS[app], cpu=settings.server_cpu) as server:
            result.before = server.counts()
            scraping = Scraper(server.port) if app is WITH else contextlib.nullcontext()
            with scraping:
                result.load = settings.generator.run(
                    server.url, connections=settings.connections, duration=settings.duration
                )
            started = time.monotonic()
            result.counts = _settle(server)
            result.settle = time.monotonic() - started
        if isinstance(scraping, Scraper):
            latencies = scraping.latencies
            if scraping.errors:
                result.error = f"{len(scraping.errors)} scrape(s) failed: {scraping.errors[0]}"
    except (ServerError, LoadError, OSError) as error:
        result.error = f"{type(error).__name__}: {error}"
    if result.load is not None and result.load.errors and result.error is None:
        result.error = f"{result.load.errors} request errors"
    return result, latencies


def run(settings: HttpSettings) -> Section:
    """The two apps, ``settings.reps`` times, side by side."""
    apps = [WITHOUT, WITH]
    matrix = Matrix(apps)
    latencies: list[float] = []
    for rep in range(settings.reps):
        order = apps if rep % 2 == 0 else apps[::-1]
        measured = {}
        for app in order:
            measured[app], scrapes = measure(app, rep, settings)
            latencies += scrapes
        matrix.reps.append(measured)

    table = Table(["app", "req/s", "p50 ms", "p99 ms", "÷ without", "CPU µs/req", "target"])
    for app in apps:
        runs = [m for m in matrix.runs(app) if m.load is not None]
        loads = [m.load for m in runs if m.load is not None]
        cpu = [c for m in runs if (c := m.cpu_per_request("cpu_process_us")) is not None]
        ratio = matrix.ratio(app, WITHOUT)
        table.add(
            app.label,
            f"{median([r.rps for r in loads]):,.0f}" if loads else "failed",
            f"{median([r.p50_ms for r in loads]):.2f}" if loads else "",
            f"{median([r.p99_ms for r in loads]):.2f}" if loads else "",
            "1.000" if app is WITHOUT else f"{ratio:.3f}",
            f"{median(cpu):.1f}" if cpu else "",
            "" if app is WITHOUT else verdict(ratio >= TARGET, f"≥ {TARGET}"),
        )
    scrape_ms = sorted(latency * 1e3 for latency in latencies)
    notes = [
        "÷ without: median of per-rep req/s ratios (same rep, same load); higher is better. "
        "CPU µs/req: the server process's CPU time per request answered, load and drain.",
        f"{len(scrape_ms)} scrapes, each answered in {median(scrape_ms):.2f} ms (median), "
        f"{scrape_ms[-1] if scrape_ms else float('nan'):.2f} ms at most. The recording "
        "(per task name: outcomes, run and wait times) runs from the first scrape on.",
    ]
    return Section(
        title=f"10. Metrics: scraped every second, {settings.reps} reps x {settings.duration} s",
        table=table,
        notes=notes,
        failures=matrix.failures(),
        data={"measurements": matrix.as_data(), "scrape_seconds": latencies},
    )
