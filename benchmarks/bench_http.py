"""1 and 2. HTTP: each app in its own Hypercorn server, under the same load, side by side.

Every measurement starts a fresh server, loads it for a fixed time, waits (bounded)
until the app's completed tasks stop lagging its added tasks, and stops the server.
Within each rep every app runs once, in an order rotated from rep to rep; the
ratios are medians of per-rep ratios against the bare app of the same rep.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .apps.counting import BODY
from .load import LoadError, LoadGenerator, LoadResult
from .section import Section, Table, median, verdict
from .server import Server, ServerError

OVERHEAD_TARGET = 0.95
SETTLE_TIMEOUT = 30.0
"""Seconds to wait at most after the load for queued tasks to finish."""
STALL_TIMEOUT = 5.0
"""Seconds without a task completing after which the wait gives up."""

TASK_KINDS = {
    "noop": "(a) no-op async task",
    "sleep": "(b) 50 ms trio.sleep task",
    "block": "(c) 10 ms blocking plain function (time.sleep)",
}


@dataclass(frozen=True, slots=True)
class App:
    framework: str
    task: str
    label: str
    journal: bool = False
    """Serve it with a journal: a new file in a new temp dir for each measurement."""
    options: tuple[tuple[str, str], ...] = ()
    """More options for the middleware, as (name, value) pairs."""

    def target(self, journal: str | None = None) -> str:
        """What Hypercorn loads: ``build(...)``, with the journal at ``journal``."""
        options = [*self.options, *([("journal", journal)] if journal is not None else [])]
        extra = "".join(f", {name}={value!r}" for name, value in options)
        return f"benchmarks.apps:build({self.framework!r}, {self.task!r}{extra})"


BARE = App("bare", "none", "bare (no middleware, no tasks)")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    generator: LoadGenerator
    connections: int
    duration: int
    """Whole seconds (wrk's unit)."""
    reps: int
    server_cpu: int | None


@dataclass(slots=True)
class Measurement:
    app: App
    rep: int
    load: LoadResult | None = None
    counts: dict[str, int] = field(default_factory=dict)
    """The app's counts after the load settled (see `benchmarks.apps.counting`)."""
    before: dict[str, int] = field(default_factory=dict)
    """The app's counts just before the load."""
    settle: float = 0.0
    error: str | None = None
    journal_rows: int | None = None
    """Rows left in the app's journal once its server stopped (None: no journal)."""

    @property
    def expected(self) -> int:
        return _expected(self.counts) if self.counts else 0

    @property
    def lost(self) -> int:
        return self.expected - self.counts.get("completed", 0)

    def cpu_per_request(self, key: str) -> float | None:
        """µs of CPU per request answered under the load (and its tasks' drain), from
        the app's ``key`` count ("cpu_trio_us", "cpu_process_us")."""
        answered = self.counts.get("answered", 0) - self.before.get("answered", 0)
        if key not in self.counts or key not in self.before or answered <= 0:
            return None
        return (self.counts[key] - self.before[key]) / answered


def _expected(counts: dict[str, int]) -> int:
    """Tasks that must complete: all added, less those trio_bg discarded (and logged)
    because their request's response never completed."""
    return counts["added"] - counts.get("discarded", 0)


def _settle(server: Server) -> dict[str, int]:
    """The app's counts once every expected task completed, or no task completed for
    `STALL_TIMEOUT` seconds, or `SETTLE_TIMEOUT` seconds have passed."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    progress_at, completed = time.monotonic(), -1
    while True:
        counts = server.counts()
        now = time.monotonic()
        if counts["completed"] != completed:
            progress_at, completed = now, counts["completed"]
        if completed >= _expected(counts) or now > deadline or now - progress_at > STALL_TIMEOUT:
            return counts
        time.sleep(0.02)


def journal_rows(path: Path) -> int:
    """The rows (queued tasks and dead letters) in the journal at ``path``."""
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        count: int = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
        return count


def measure(app: App, rep: int, settings: HttpSettings) -> Measurement:
    result = Measurement(app, rep)
    with contextlib.ExitStack() as stack:
        journal = None
        if app.journal:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="trio_bg_bench_"))
            journal = Path(directory) / "tasks.db"
        try:
            with Server(
                app.target(None if journal is None else str(journal)), cpu=settings.server_cpu
            ) as server:
                result.before = server.counts()
                result.load = settings.generator.run(
                    server.url, connections=settings.connections, duration=settings.duration
                )
                started = time.monotonic()
                result.counts = _settle(server)
                result.settle = time.monotonic() - started
            if journal is not None:  # the server has stopped: every task ran, or not
                result.journal_rows = journal_rows(journal)
        except (ServerError, LoadError, OSError, sqlite3.Error) as error:
            result.error = f"{type(error).__name__}: {error}"
    if result.load is not None and result.load.errors and result.error is None:
        result.error = f"{result.load.errors} request errors"
    return result


@dataclass
class Matrix:
    """Every app's measurement in every rep."""

    apps: list[App]
    reps: list[dict[App, Measurement]] = field(default_factory=list)

    def runs(self, app: App) -> list[Measurement]:
        return [rep[app] for rep in self.reps]

    def ratio(self, app: App, base: App) -> float:
        """Median over reps of app req/s ÷ base req/s, both from the same rep."""
        ratios = [
            rep[app].load.rps / rep[base].load.rps  # type: ignore[union-attr]
            for rep in self.reps
            if rep[app].load is not None and rep[base].load is not None
        ]
        return median([r for r in ratios if r == r])

    def failures(self) -> list[str]:
        problems = []
        for rep in self.reps:
            for app, m in rep.items():
                if m.error is not None:
                    problems.append(f"{app.label} (rep {m.rep + 1}): {m.error}")
                elif m.lost:
                    problems.append(
                        f"{app.label} (rep {m.rep + 1}): {m.lost} of {m.expected} tasks never "
                        f"completed (waited {m.settle:.1f} s)"
                    )
                elif m.journal_rows:
                    problems.append(
                        f"{app.label} (rep {m.rep + 1}): {m.journal_rows} rows left in the "
                        f"journal after every task completed and the server stopped"
                    )
        return problems

    def as_data(self) -> list[dict[str, object]]:
        return [
            {**asdict(m), "app": m.app.label, "framework": m.app.framework, "task": m.app.task}
            for rep in self.reps
            for m in rep.values()
        ]


def run_matrix(apps: Sequence[App], settings: HttpSettings, progress: str) -> Matrix:
    matrix = Matrix(list(apps))
    for rep in range(settings.reps):
        shift = rep % len(apps)
        order = [*apps[shift:], *apps[:shift]]
        if sys.stderr.isatty():
            print(f"  {progress}: rep {rep + 1}/{settings.reps}", end="\r", file=sys.stderr)
        matrix.reps.append({app: measure(app, rep, settings) for app in order})
    if sys.stderr.isatty():
        print(" " * 40, end="\r", file=sys.stderr)
    return matrix


def tasks_cell(app: App, runs: Sequence[Measurement]) -> str:
    """The tasks column: all completed, or how many were lost; discarded, rejected."""
    expected = sum(m.expected for m in runs)
    lost = sum(max(m.lost, 0) for m in runs)
    discarded = sum(m.counts.get("discarded", 0) for m in runs)
    rejected = sum(m.counts.get("rejected", 0) for m in runs)
    if app.task == "none":
        tasks = "-"
    elif lost:
        tasks = f"LOST {lost:,} of {expected:,}"
    else:
        tasks = f"all {expected:,}"
    if discarded:
        tasks += f" +{discarded} discarded"
    if rejected:
        tasks += f" +{rejected} rejected"
    return tasks


def versus_cells(matrix: Matrix, app: App, base: App, runs: Sequence[Measurement]) -> list[str]:
    """req/s, p50 ms, p99 ms (medians over ``runs``, those of ``app`` that loaded), then ÷
    ``base`` (median of per-rep req/s ratios) and +p50, +p99 ms (median of per-rep
    differences): one row of an HTTP table read against its reference row."""
    loads = [m.load for m in runs if m.load is not None]
    cells = [
        f"{median([r.rps for r in loads]):,.0f}",
        f"{median([r.p50_ms for r in loads]):.2f}",
        f"{median([r.p99_ms for r in loads]):.2f}",
    ]
    if app == base:
        return [*cells, "1.000", "", ""]
    return [
        *cells,
        f"{matrix.ratio(app, base):.3f}",
        f"{paired_difference(matrix, app, base, 'p50_ms'):+.2f}",
        f"{paired_difference(matrix, app, base, 'p99_ms'):+.2f}",
    ]


def paired_difference(matrix: Matrix, app: App, base: App, field: str) -> float:
    """Median over reps of ``app``'s load ``field`` minus ``base``'s, from the same rep."""
    return median(
        [
            getattr(rep[app].load, field) - getattr(rep[base].load, field)
            for rep in matrix.reps
            if rep[app].load is not None and rep[base].load is not None
        ]
    )


def _row(matrix: Matrix, app: App, base: App) -> list[str]:
    runs = [m for m in matrix.runs(app) if m.load is not None]
    if not runs:
        return [app.label, "failed", "", "", "", ""]
    loads = [m.load for m in runs if m.load is not None]
    tasks = tasks_cell(app, runs)
    return [
        app.label,
        f"{median([r.rps for r in loads]):,.0f}",
        f"{median([r.p50_ms for r in loads]):.1f}",
        f"{median([r.p99_ms for r in loads]):.1f}",
        "1.000" if app == base else f"{matrix.ratio(app, base):.3f}",
        tasks,
    ]


HEADER = ["app", "req/s", "p50 ms", "p99 ms", "÷ bare", "tasks completed"]
TASKS_NOTE = (
    "tasks completed: of those added (trio_bg: of those accepted once the response completed; "
    "'discarded' tasks belong to requests whose response never completed, e.g. cut off when "
    "the load stopped; 'rejected' ones met a full nursery)."
)


def _find(apps: Sequence[App], like: App) -> App:
    return next(a for a in apps if (a.framework, a.task) == (like.framework, like.task))


def quart_problem() -> str | None:
    """Why Quart-Trio cannot be benchmarked here, or None when it can."""
    try:
        import quart_trio  # noqa: F401
    except ImportError as error:
        return f"quart-trio is not installed ({error})"
    app = App("quart", "noop", "Quart-Trio probe")
    try:
        with (
            Server(app.target(), cpu=None) as server,
            urllib.request.urlopen(server.url, timeout=5) as response,
        ):
            body = response.read()
    except (ServerError, OSError) as error:
        return f"a Quart-Trio app did not serve: {error}"
    return None if body == BODY else f"a Quart-Trio app answered {body!r}"


def overhead(settings: HttpSettings) -> Section:
    """1. The middleware's cost on a raw ASGI app, with the floor of one trio task each."""
    floor = App("raw+nursery", "noop", "raw trio nursery + 1 no-op task")
    passthrough = App("raw+trio_bg", "none", "BackgroundTaskMiddleware, no task")
    wrapped = App("raw+trio_bg", "noop", "BackgroundTaskMiddleware + 1 no-op task")
    matrix = run_matrix([BARE, floor, passthrough, wrapped], settings, "HTTP overhead")
    table = Table([*HEADER, "target"])
    for app in (BARE, floor, passthrough):
        table.add(*_row(matrix, app, BARE))
    ratio = matrix.ratio(wrapped, BARE)
    table.add(
        *_row(matrix, wrapped, BARE), verdict(ratio >= OVERHEAD_TARGET, f"≥ {OVERHEAD_TARGET}")
    )
    table.add("    trio_bg ÷ raw trio nursery", "", "", "", f"{matrix.ratio(wrapped, floor):.3f}")
    return Section(
        title=f"1. HTTP overhead: raw ASGI app, {settings.reps} reps x {settings.duration} s",
        table=table,
        notes=[
            "÷ bare: median of per-rep req/s ratios (same rep, same load); higher is better. "
            "The raw nursery row starts one plain trio task per request after the response "
            "(no bookkeeping): the floor for any design that runs each task as a trio task.",
            TASKS_NOTE,
        ],
        failures=matrix.failures(),
        data={"measurements": matrix.as_data()},
    )


def anchors(settings: HttpSettings, *, quart: str | None) -> Section:
    """2. trio_bg against Starlette's and Quart-Trio's own background tasks."""
    frameworks = [
        ("starlette", "Starlette BackgroundTasks"),
        ("starlette+trio_bg", "Starlette + trio_bg"),
    ]
    if quart is None:
        frameworks += [
            ("quart", "Quart-Trio add_background_task"),
            ("quart+trio_bg", "Quart-Trio + trio_bg"),
        ]
    apps = [BARE]
    for task in TASK_KINDS:
        apps += [App(framework, task, label) for framework, label in frameworks]
    matrix = run_matrix(apps, settings, "HTTP anchors")

    table = Table(HEADER)
    table.add(*_row(matrix, BARE, BARE))
    for task, title in TASK_KINDS.items():
        table.add(title)
        for app in apps:
            if app.task == task:
                label, *cells = _row(matrix, app, BARE)
                table.add(f"  {label}", *cells)
        for native, _ in frameworks[::2]:
            ours, theirs = App(f"{native}+trio_bg", task, ""), App(native, task, "")
            ratio = matrix.ratio(_find(apps, ours), _find(apps, theirs))
            table.add(f"    trio_bg ÷ {_find(apps, theirs).label}", "", "", "", f"{ratio:.3f}")
    notes = [
        TASKS_NOTE,
        "Starlette runs its task inline after the body, holding the connection: the next "
        "request on it waits (throughput and latency of the *next* request pay, not this one).",
        "Quart-Trio starts the task at once in the app's nursery; trio_bg starts it once the "
        "response is complete. Same body and headers everywhere.",
    ]
    if quart is not None:
        notes.append(f"Quart-Trio skipped: {quart}")
    return Section(
        title=f"2. Against the anchors: {settings.reps} reps x {settings.duration} s, "
        "one task per request",
        table=table,
        notes=notes,
        failures=matrix.failures(),
        data={"measurements": matrix.as_data(), "quart_skipped": quart},
    )
