"""The crash drill: serve an app on a journal, SIGKILL it under load, serve it again on
the same journal, and check that every durable task an answered request named ran.

With ``--poison``, mid-load, the drill also writes a row that cannot be read into the
journal, and asks the app (``GET`` `POISON_PATH`) for a durable task that SIGKILLs its
process, named in `POISON_HEADER`: the first life dies of it, and the second must make
both dead letters while every other task runs.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import trio

from ..._keeping import journal_file, journal_schema
from .harness import (
    LEDGER_ENV,
    Books,
    DrillPlan,
    Progress,
    Server,
    Table,
    drill_directory,
    read_ledger,
    read_report,
    run_and_print,
    run_logged,
    served,
    verdict_json,
)
from .load import DURABLE_HEADER, REQUEST_TIMEOUT, load_and_stop
from .outcome import DriveRecord, ServerDrillResult

DRILL_LEASE = 5.0
"""The journal lease the crash drill gives its server unless told otherwise: the
second life resumes what the killed first one had claimed once it expires."""

RESUME_MARGIN = 30.0
"""Seconds, past the lease, the second life gets to run every claimed durable task."""

POISON_PATH = "/trio-bg-drill/poison"
"""Where the app under a ``--poison`` drill adds a durable task that kills its process."""
POISON_HEADER = "x-trio-bg-poison"
"""The response header naming that task."""


@dataclass(frozen=True, kw_only=True)
class CrashDrillResult(ServerDrillResult):
    """The outcome of a crash drill: ``load`` is the first life's, ``report`` and
    ``exit_status`` the second life's; it passed when no claimed durable task was lost
    and both lives behaved."""

    killed_after: float | None
    """Seconds of load before SIGKILL (None: the first life never served)."""
    resumed_after: float | None
    """Seconds from the second life's start until every claimed task had run (None:
    not within the lease and `RESUME_MARGIN`)."""
    books: Books | None
    """The durable tasks across both lives."""
    dead_letters: tuple[str, ...]
    """The journal's dead letters after the second life: ``ID NAME: ERROR``."""

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data, for scripts."""
        books = self.books
        return verdict_json(self.plan.app, self.problems, None) | {
            "journal": self.plan.journal,
            "first_life": self.load.counts() | {"killed_after": self.killed_after},
            "second_life": {
                "resumed_after": self.resumed_after,
                "exit_status": self.exit_status,
                "report": None if self.report is None else asdict(self.report),
            },
            "durable_tasks": None
            if books is None
            else books.to_json("ran", "ran_twice") | {"dead_letters": list(self.dead_letters)},
            "log_tail": list(self.server_log_tail),
        }


def crash_drill(plan: DrillPlan, *, json_output: bool) -> int:
    """Run the crash drill, print its outcome, and return the exit status."""
    run = partial(run_crash_drill, plan)
    return run_and_print(run, format_crash_result, json_output=json_output)


@dataclass(kw_only=True)
class _Lives(DriveRecord):
    """What the two lives produced (``exit_status``: the second life's)."""

    killed_after: float | None = None
    resumed_after: float | None = None
    second_served: bool = False
    poison: str | None = None  # the name of the app's task that kills its process
    planted: int | None = None  # the id of the row that cannot be read


def run_crash_drill(plan: DrillPlan, progress: Progress) -> CrashDrillResult:
    """Serve, load, SIGKILL; serve again on the same journal; check the durable tasks."""
    assert plan.journal is not None
    with drill_directory("trio_bg-crash-drill-") as directory:
        lives, log_tail = run_logged(directory, partial(_drive, plan, progress, directory))
        report = None
        if lives.exit_status is not None and lives.second_served:
            report = read_report(directory / "second.json", lives.problems)
        runs = read_ledger(directory / "ledger")
    books = None
    dead_letters: tuple[str, ...] = ()
    if lives.killed_after is not None and lives.second_served:
        books = Books.of(lives.load.durable, runs)
        dead_letters = _dead_letters(plan.journal)
    return CrashDrillResult(
        plan=plan,
        load=lives.load,
        killed_after=lives.killed_after,
        resumed_after=lives.resumed_after,
        report=report,
        exit_status=lives.exit_status,
        books=books,
        dead_letters=dead_letters,
        problems=tuple(lives.problems + _problems(lives, books, dead_letters)),
        server_log_tail=log_tail,
    )


async def _drive(plan: DrillPlan, progress: Progress, directory: Path, log: BinaryIO) -> _Lives:
    lives = _Lives()
    for life in ("first", "second"):
        async with served(plan, directory, directory / f"{life}.json", log) as server:
            if server.problem is not None:
                lives.problems.append(f"{life} life: {server.problem}")
                return lives
            if life == "first":
                await _first_life(plan, progress, server, lives)
            else:
                await _second_life(plan, progress, directory, server, lives)
    lives.exit_status = server.process.returncode
    return lives


async def _first_life(plan: DrillPlan, progress: Progress, server: Server, lives: _Lives) -> None:
    """Load the server, and SIGKILL it part-way (poisoning it first, if asked)."""
    process, port = server.process, server.port
    progress.milestone(f"drill: serving {plan.app} on 127.0.0.1:{port} (pid {process.pid})")
    poison = partial(_poison, plan, process, port, lives, progress) if plan.poison else None
    lives.killed_after, _ = await load_and_stop(
        plan, process, port, lives.load, progress, stop=signal.SIGKILL, alongside=poison
    )


async def _poison(
    plan: DrillPlan, process: trio.Process, port: int, lives: _Lives, progress: Progress
) -> None:
    """Mid-load: plant a row that cannot be read, and have the app add its task that
    kills its process; return once that killed it."""
    assert plan.journal is not None
    await trio.sleep(plan.signal_after / 2)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, trust_env=False) as client:
        try:
            response = await client.get(f"http://127.0.0.1:{port}{POISON_PATH}")
        except httpx.HTTPError as error:
            lives.problems.append(f"--poison: GET {POISON_PATH} failed: {error!r}")
            return
    lives.poison = response.headers.get(POISON_HEADER)
    if response.status_code != 200 or lives.poison is None:
        lives.problems.append(
            f"--poison: GET {POISON_PATH} answered {response.status_code} without "
            f"{POISON_HEADER}: the app must add a durable task that kills its process there, "
            f"and name it in that header"
        )
        return
    with contextlib.closing(journal_schema.connect(plan.journal, create=False)) as connection:
        lives.planted = journal_file.plant_unreadable(connection, lives.poison)
    progress.milestone(
        f"drill: planted task {lives.planted}, a row that cannot be read, and {lives.poison}, "
        f"a task that kills its process"
    )
    with trio.move_on_after(plan.stop_deadline):
        await process.wait()
    if process.returncode is None:
        lives.problems.append(f"--poison: {lives.poison} did not kill the first life")


async def _second_life(
    plan: DrillPlan, progress: Progress, directory: Path, server: Server, lives: _Lives
) -> None:
    """Wait until the second life ran every claimed task (or none is left), and stop it."""
    assert plan.journal is not None
    process, port = server.process, server.port
    lives.second_served = True
    claimed = set(lives.load.durable)
    begun = trio.current_time()
    lease = plan.journal_lease or DRILL_LEASE
    progress.milestone(
        f"drill: serving it again on the same journal, on 127.0.0.1:{port} (pid "
        f"{process.pid}); waiting for the {len(claimed)} durable task(s) the answered "
        f"requests named (the killed server's claims expire after {lease:g}s)"
    )
    with trio.move_on_after(lease + RESUME_MARGIN):
        await _until_ran_or_nothing_left(claimed, directory / "ledger", plan.journal)
    if claimed <= set(read_ledger(directory / "ledger")):
        lives.resumed_after = trio.current_time() - begun
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(plan.stop_deadline):
        await process.wait()
    if process.returncode is None:
        lives.problems.append(f"the second life did not stop within {plan.stop_deadline:g}s")
    else:
        progress.milestone(f"drill: the second life exited with status {process.returncode}")


async def _until_ran_or_nothing_left(claimed: set[str], ledger: Path, journal: str) -> None:
    """Return once every ``claimed`` task has run, or the journal holds no task still
    to run (then the missing ones are lost)."""
    with contextlib.closing(journal_schema.connect(journal, create=False)) as connection:
        # The ledger and the journal are files other processes write: nothing to wait on.
        while not claimed <= set(read_ledger(ledger)):
            if journal_file.queued(connection) == 0:
                return
            await trio.sleep(0.1)


def _dead_letters(journal: str) -> tuple[str, ...]:
    with contextlib.closing(journal_schema.connect(journal, create=False)) as connection:
        return tuple(
            f"{row.id} {row.name}: {row.error}"
            for row in journal_file.rows(connection, state="dead")
        )


def _problems(lives: _Lives, books: Books | None, dead_letters: tuple[str, ...]) -> list[str]:
    problems = []
    if books is not None:
        problems += books.problems(
            "durable",
            DURABLE_HEADER,
            f"add durable tasks when {LEDGER_ENV} is set",
            " (any that failed every attempt are dead letters in the journal: python -m "
            "trio_bg journal ls)",
        )
        if lives.planted is not None and not any(
            letter.startswith(f"{lives.planted} ") for letter in dead_letters
        ):
            problems.append(
                f"--poison: task {lives.planted}, which cannot be read, is no dead letter"
            )
        if lives.poison is not None and not any(
            f" {lives.poison}: " in letter and "its process died" in letter
            for letter in dead_letters
        ):
            problems.append(
                f"--poison: {lives.poison}, which kills its process, is no dead letter saying so"
            )
    if lives.exit_status not in (None, 0, 1):
        problems.append(f"the second life exited with status {lives.exit_status}")
    return problems


def format_crash_result(result: CrashDrillResult) -> str:
    """The crash drill's outcome as a table, for people."""
    plan, load, books, report = result.plan, result.load, result.books, result.report
    poisoned = ", poisoned mid-load" if plan.poison else ""
    title = f"{plan.load_title('SIGKILL')}, journal {plan.journal}{poisoned}"
    table = Table(f"trio_bg crash drill of {plan.app}: {title}", 26)
    row = table.row
    table.section("first life (killed)")
    table.requests(load, plan.requests, sent="requests sent", failed="cut off by the kill, mostly")
    if result.killed_after is not None:
        row("SIGKILL after", f"{result.killed_after:.2f}s", "of load")
    table.section("second life (the same journal)")
    if report is not None:
        row("recovered from journal", report.recovered, "tasks the first life left behind")
        row("accepted", report.accepted)
        row("completed", report.completed)
        row("failed", report.failed, "(dead letters: python -m trio_bg journal ls)")
        row("deferred", report.deferred, "left in the journal at its own shutdown")
    if result.resumed_after is not None:
        row("all claimed tasks ran", f"{result.resumed_after:.2f}s", "after it started")
    row("exit status", result.exit_status)
    if books is not None:
        table.section("durable tasks, across both lives")
        books.rows(
            table,
            DURABLE_HEADER,
            ran="ran at least once",
            extra="at least once: ended just before the kill",
            unclaimed="stored, but the answer was cut off",
        )
        row("dead letters", len(result.dead_letters), "python -m trio_bg journal ls")
        table.lines.extend(f"      {letter}" for letter in result.dead_letters[:10])
    passed = "every durable task an answered request named ran at least once"
    return table.end(passed, result.problems, logs=result.server_logs())
