"""The distributed drill's plan (the web server's, its workers' and Redis's) and its
outcome, as JSON and as a table."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..supervisor import describe_exit
from ..worker_command import load_streaq_worker
from .harness import Books, DrillPlan, Table, free_port, verdict_json
from .load import REMOTE_HEADER
from .shutdown import DrillResult

if TYPE_CHECKING:
    from streaq import Worker

REDIS_ENV = "TRIO_BG_DRILL_REDIS"
"""The environment variable giving the app's module Redis's URL: with it, the module
builds the streaq worker its remote tasks go to (as ``examples/drill_app.py`` does)."""

IDLE_TIMEOUT_ENV = "TRIO_BG_DRILL_IDLE_TIMEOUT"
"""The environment variable the drill's ``--idle-timeout`` sets, for the app's module
to build its worker with (``examples/drill_app.py`` does)."""


@dataclass(frozen=True, kw_only=True)
class RemotePlan:
    """The distributed drill's options: the drill's own, and its workers' and Redis's."""

    drill: DrillPlan
    streaq: str
    """``module:name`` of the streaq worker: the workers run it, the web server hands
    its remote tasks to it. The app's own spec: the app is a BackgroundTaskMiddleware
    given its worker (``streaq=``), and the server takes it from there."""
    redis: str | None = None
    """Redis's URL; None: the drill starts a ``redis-server`` of its own."""
    workers: int = 2
    kill_worker: bool = False
    kill_redis: bool = False
    """Kill Redis mid-load and start it again on the same port (its own Redis only)."""
    redis_persists: bool = True
    """Whether the drill's own Redis keeps its data on disk (False: `kill_redis` brings
    it back empty, as a Redis without persistence, or a failover to an empty replica)."""
    idle_timeout: float | None = None
    """Set as `IDLE_TIMEOUT_ENV` for the app's module (None: left as it is)."""
    poison: bool = False
    """Plant a poisoned record (valid JSON, not a task's) in the queue mid-load: a
    worker must set it aside, and go on."""

    def server_command(self, port: int, report_path: Path) -> list[str]:
        """The web server's ``python -m trio_bg serve`` command line."""
        command = self.drill.server_command(port, report_path)
        if self.streaq != self.drill.app:
            command.append(f"--streaq={self.streaq}")
        return command

    def worker_command(self) -> list[str]:
        """A streaq worker's ``python -m trio_bg worker`` command line."""
        return [sys.executable, "-m", "trio_bg", "worker", self.streaq]


@dataclass(frozen=True, kw_only=True)
class Target:
    """A plan made ready: Redis's URL, and the streaq worker loaded in this process
    (for its queue, idle timeout and grace period)."""

    plan: RemotePlan
    url: str
    own_port: int | None
    """The port of the drill's own Redis (None: the plan's)."""
    worker: Worker[Any]


def prepare(plan: RemotePlan) -> Target:
    """Choose Redis's URL and load ``plan.streaq`` here as the workers will, with
    `REDIS_ENV` (and `IDLE_TIMEOUT_ENV`) set in this process's environment first.
    Raises what `load_streaq_worker` raises."""
    own_port = None
    url = plan.redis
    if url is None:
        own_port = free_port()
        url = f"redis://127.0.0.1:{own_port}"
    os.environ[REDIS_ENV] = url
    if plan.idle_timeout is not None:
        os.environ[IDLE_TIMEOUT_ENV] = str(plan.idle_timeout)
    return Target(plan=plan, url=url, own_port=own_port, worker=load_streaq_worker(plan.streaq))


@dataclass(kw_only=True)
class WorkerRun:
    """One streaq worker process of the drill."""

    pid: int
    killed_after: float | None = None
    """Seconds of load before the drill SIGKILLed it (None: it was not)."""
    exit_status: int | None = None
    ran: int = 0
    """Remote tasks it ran to the end (its lines in the ledger)."""
    cut_short: int = 0
    """Remote tasks it had started and never finished (those the kill cut short)."""


@dataclass(kw_only=True)
class Poison:
    """The poisoned record the drill planted in the queue (``poison``)."""

    task_id: str
    planted_after: float
    """Seconds of load before the drill planted it."""
    error: str | None = None
    """The error its failed result records (None: no worker set it aside)."""


@dataclass(frozen=True, kw_only=True)
class RemoteDrillResult:
    """The outcome of a distributed drill."""

    target: Target
    server: DrillResult
    """The web server's part, as the shutdown drill sees it."""
    workers: tuple[WorkerRun, ...]
    redis_killed_after: float | None
    """Seconds of load before the drill killed Redis (None: it did not)."""
    redis_down_for: float | None
    """Seconds from that kill until Redis accepted connections again."""
    drained_after: float | None
    """Seconds from the web server's exit until every claimed task had run (None: not
    all of them did)."""
    poison: Poison | None
    books: Books | None
    """The remote tasks: what answered requests named, and what the workers ran."""
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    logs: dict[str, tuple[str, ...]]
    """The last warnings and errors of each process that failed, by its name."""

    @property
    def passed(self) -> bool:
        """True when no claimed remote task was lost and every step went as planned."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data, for scripts."""
        plan, server, books = self.target.plan, self.server, self.books
        load, report = server.load, server.report
        return verdict_json(plan.drill.app, self.problems, self.notes) | {
            "plan": asdict(plan),
            "web_server": load.counts()
            | load.seen()
            | server.server_json()
            | {
                "claimed": load.claimed if load.claims else None,
                "unaccounted": server.unaccounted,
                "report": None if report is None else asdict(report),
            },
            "workers": [asdict(worker) for worker in self.workers],
            "redis": {
                "url": self.target.url,
                "own": self.target.own_port is not None,
                "killed_after": self.redis_killed_after,
                "down_for": self.redis_down_for,
            },
            "remote_tasks": None
            if books is None
            else books.to_json("completed", "extra_runs")
            | {
                "cut_short": sum(worker.cut_short for worker in self.workers),
                "drained_after": self.drained_after,
            },
            "poison": None if self.poison is None else asdict(self.poison),
            "logs": {name: list(lines) for name, lines in self.logs.items()},
        }


def format_remote_result(result: RemoteDrillResult) -> str:
    """The distributed drill's outcome as a table, for people."""
    target, server = result.target, result.server
    plan, load, report = target.plan, server.load, server.report
    drill = plan.drill
    title = (
        f"trio_bg distributed drill of {drill.app}: {drill.load_title('SIGTERM')}, "
        f"{plan.workers} streaq workers"
    )
    if plan.kill_worker:
        title += ", one SIGKILLed mid-load"
    if plan.kill_redis:
        title += ", Redis restarted mid-load"
        if not plan.redis_persists:
            title += " without its data"
    if plan.poison:
        title += ", a poisoned record planted mid-load"
    if drill.journal is not None:
        title += f", journal {drill.journal}"
    table = Table(title, 26)
    row = table.row

    table.section("web server")
    table.requests(load, drill.requests, sent="requests sent")
    if server.signal_after is not None:
        row("SIGTERM after", f"{server.signal_after:.2f}s", "of load")
    if report is None:
        row("accepted", "?", "no report from the web server")
    else:
        row("accepted", report.accepted, "tasks, local and remote")
        row("handed off", report.handed_off, "remote tasks Redis acknowledged")
        row("discarded", report.discarded, "their request failed (503, error); never ran")
        if report.unconfirmed:
            row(
                "unconfirmed",
                report.unconfirmed,
                "their request failed, Redis did not answer; may run",
            )
        if report.resent:
            row("handed off again", report.resent, "from the journal, after Redis lost them")
        if report.maybe_lost:
            row("perhaps lost", report.maybe_lost, "Redis lost them, no journal kept them")
        remote = f", {report.outbox} of them remote" if report.outbox else ""
        row("deferred", report.deferred, f"left in the journal for its next start{remote}")
        row("unaccounted", server.unaccounted)
    if server.stopped_after is not None:
        row(
            "stopped after",
            f"{server.stopped_after:.2f}s",
            f"{drill.grace}; exit status {server.exit_status}",
        )

    table.section(f"streaq workers ({plan.streaq})")
    row("started", len(result.workers))
    for worker in result.workers:
        ended = "" if worker.exit_status is None else describe_exit(worker.exit_status)
        if worker.killed_after is not None:
            ended = f"SIGKILL after {worker.killed_after:.2f}s of load"
        comment = "ran" + (f", {worker.cut_short} cut short" if worker.cut_short else "")
        row(f"worker {worker.pid}", worker.ran, f"{comment}; {ended}" if ended else comment)

    table.section(f"Redis ({'its own, ' if target.own_port else ''}{target.url})")
    if result.redis_killed_after is not None:
        row("restarted after", f"{result.redis_killed_after:.2f}s", "of load (SIGKILL)")
    if result.redis_down_for is not None:
        row("down for", f"{result.redis_down_for:.2f}s", "until it took connections again")
    if not plan.kill_redis:
        row("restarted", "no", "(--kill-redis restarts it mid-load)")

    if result.books is not None:
        table.section("remote tasks")
        result.books.rows(
            table,
            REMOTE_HEADER,
            ran="completed at least once",
            extra="at least once: run again after a kill",
            unclaimed="handed off, but the answer was not received",
        )
        if result.drained_after is not None:
            row("all claimed ran", f"{result.drained_after:.2f}s", "after the web server stopped")
    if result.poison is not None:
        poison = result.poison
        table.section("poisoned record")
        row("planted after", f"{poison.planted_after:.2f}s", f"of load: {poison.task_id}")
        row("set aside", "yes" if poison.error else "no", poison.error or "")
    logs = {f"the last warnings and errors of {name}": tail for name, tail in result.logs.items()}
    passed = "every remote task an answered request named completed at least once"
    return table.end(passed, result.problems, result.notes, logs)
