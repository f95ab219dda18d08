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
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import trio

from . import _journal_file as journal_file
from ._drill import (
    DURABLE_HEADER,
    LEDGER_ENV,
    LOG_TAIL_LINES,
    REQUEST_TIMEOUT,
    DrillInterrupted,
    DrillPlan,
    Load,
    Progress,
    _free_port,
    _interrupt_on_signal,
    _load_and_stop,
    _read_report,
    _reap,
    _wait_until_listening,
    row_writer,
    run_and_print,
)
from ._report import ShutdownReport

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
class CrashBooks:
    """The durable tasks across both lives."""

    claimed: int
    """Durable tasks named by answered responses (`DURABLE_HEADER`)."""
    ran: int
    """Of those, the ones that ran at least once."""
    lost: tuple[str, ...]
    """The keys of those that never ran."""
    ran_twice: int
    """Runs beyond the first of claimed tasks (at-least-once: a task that ended just
    before the kill, but whose row was not yet removed, runs again)."""
    unclaimed_runs: int
    """Runs of tasks no answered response named: their request's answer was cut off by
    the kill after the tasks were stored (the client saw an error; the task still ran)."""
    dead_letters: tuple[str, ...] = ()
    """The journal's dead letters after the second life: ``ID NAME: ERROR``."""


@dataclass(frozen=True, kw_only=True)
class CrashDrillResult:
    """The outcome of a crash drill."""

    plan: DrillPlan
    load: Load
    killed_after: float | None
    """Seconds of load before SIGKILL (None: the first life never served)."""
    resumed_after: float | None
    """Seconds from the second life's start until every claimed task had run (None:
    not within the lease and `RESUME_MARGIN`)."""
    report: ShutdownReport | None
    """The second life's shutdown report."""
    exit_status: int | None
    books: CrashBooks | None
    problems: tuple[str, ...]
    server_log_tail: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True when no claimed durable task was lost and both lives behaved."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data, for scripts."""
        books = self.books
        return {
            "app": self.plan.app,
            "verdict": "pass" if self.passed else "fail",
            "problems": list(self.problems),
            "journal": self.plan.journal,
            "first_life": {
                "sent": self.load.sent,
                "answered": self.load.answered,
                "refused": self.load.refused,
                "failed": self.load.failed,
                "killed_after": self.killed_after,
            },
            "second_life": {
                "resumed_after": self.resumed_after,
                "exit_status": self.exit_status,
                "report": None if self.report is None else asdict(self.report),
            },
            "durable_tasks": None
            if books is None
            else {
                "claimed": books.claimed,
                "ran": books.ran,
                "lost": list(books.lost),
                "ran_twice": books.ran_twice,
                "unclaimed_runs": books.unclaimed_runs,
                "dead_letters": list(books.dead_letters),
            },
            "log_tail": list(self.server_log_tail),
        }


def crash_drill(plan: DrillPlan, *, json_output: bool) -> int:
    """Run the crash drill, print its outcome, and return the exit status."""
    run = partial(run_crash_drill, plan)
    return run_and_print(run, format_crash_result, json_output=json_output)


@dataclass(kw_only=True)
class _Lives:
    load: Load = field(default_factory=Load)
    problems: list[str] = field(default_factory=list)
    killed_after: float | None = None
    resumed_after: float | None = None
    exit_status: int | None = None
    second_served: bool = False
    interrupted_by: str | None = None
    poison: str | None = None  # the name of the app's task that kills its process
    planted: int | None = None  # the id of the row that cannot be read

    def interrupt(self, signal_name: str) -> None:
        self.interrupted_by = signal_name


def run_crash_drill(plan: DrillPlan, progress: Progress) -> CrashDrillResult:
    """Serve, load, SIGKILL; serve again on the same journal; check the durable tasks."""
    assert plan.journal is not None
    with tempfile.TemporaryDirectory(prefix="trio_bg-crash-drill-") as name:
        directory = Path(name)
        log_path = directory / "server.log"
        with log_path.open("wb") as log:
            lives = trio.run(_drive, plan, progress, log, directory)
        if lives.interrupted_by is not None:
            raise DrillInterrupted(f"the drill was interrupted by {lives.interrupted_by}")
        log_tail = tuple(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        report = None
        if lives.exit_status is not None and lives.second_served:
            report = _read_report(directory / "second.json", lives.problems)
        runs = _ledger(directory / "ledger")
    books = None
    if lives.killed_after is not None and lives.second_served:
        books = _books(lives.load, runs, _dead_letters(plan.journal))
    problems = lives.problems + _problems(lives, books)
    return CrashDrillResult(
        plan=plan,
        load=lives.load,
        killed_after=lives.killed_after,
        resumed_after=lives.resumed_after,
        report=report,
        exit_status=lives.exit_status,
        books=books,
        problems=tuple(problems),
        server_log_tail=log_tail,
    )


async def _drive(plan: DrillPlan, progress: Progress, log: BinaryIO, directory: Path) -> _Lives:
    lives = _Lives()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_interrupt_on_signal, signals, nursery.cancel_scope, lives.interrupt)
            if await _first_life(plan, progress, log, directory, lives):
                await _second_life(plan, progress, log, directory, lives)
            nursery.cancel_scope.cancel()
    return lives


async def _start(
    plan: DrillPlan, log: BinaryIO, directory: Path, life: str, lives: _Lives
) -> tuple[trio.Process, int] | None:
    port = _free_port()
    process = await trio.lowlevel.open_process(
        plan.server_command(port, directory / f"{life}.json"),
        env=plan.server_env(directory),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    problem = await _wait_until_listening(process, port)
    if problem is not None:
        await _reap(process)
        lives.problems.append(f"{life} life: {problem}")
        return None
    return process, port


async def _first_life(
    plan: DrillPlan, progress: Progress, log: BinaryIO, directory: Path, lives: _Lives
) -> bool:
    started = await _start(plan, log, directory, "first", lives)
    if started is None:
        return False
    process, port = started
    try:
        progress.milestone(f"drill: serving {plan.app} on 127.0.0.1:{port} (pid {process.pid})")
        poison = partial(_poison, plan, process, port, lives, progress) if plan.poison else None
        lives.killed_after, _ = await _load_and_stop(
            plan, process, port, lives.load, progress, stop=signal.SIGKILL, alongside=poison
        )
    finally:
        await _reap(process)
    return True


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
    with contextlib.closing(journal_file.connect(plan.journal, create=False)) as connection:
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
    plan: DrillPlan, progress: Progress, log: BinaryIO, directory: Path, lives: _Lives
) -> None:
    started = await _start(plan, log, directory, "second", lives)
    if started is None:
        return
    process, port = started
    assert plan.journal is not None
    lives.second_served = True
    claimed = set(lives.load.durable)
    begun = trio.current_time()
    lease = plan.journal_lease or DRILL_LEASE
    try:
        progress.milestone(
            f"drill: serving it again on the same journal, on 127.0.0.1:{port} (pid "
            f"{process.pid}); waiting for the {len(claimed)} durable task(s) the answered "
            f"requests named (the killed server's claims expire after {lease:g}s)"
        )
        with trio.move_on_after(lease + RESUME_MARGIN):
            await _until_ran_or_nothing_left(claimed, directory / "ledger", plan.journal)
        if claimed <= set(_ledger(directory / "ledger")):
            lives.resumed_after = trio.current_time() - begun
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(plan.stop_deadline):
            await process.wait()
        if process.returncode is None:
            lives.problems.append(f"the second life did not stop within {plan.stop_deadline:g}s")
        else:
            progress.milestone(f"drill: the second life exited with status {process.returncode}")
    finally:
        await _reap(process)
        lives.exit_status = process.returncode


async def _until_ran_or_nothing_left(claimed: set[str], ledger: Path, journal: str) -> None:
    """Return once every ``claimed`` task has run, or the journal holds no task still
    to run (then the missing ones are lost)."""
    with contextlib.closing(journal_file.connect(journal, create=False)) as connection:
        # The ledger and the journal are files other processes write: nothing to wait on.
        while not claimed <= set(_ledger(ledger)):
            if journal_file.queued(connection) == 0:
                return
            await trio.sleep(0.1)


def _ledger(path: Path) -> Counter[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Counter()
    return Counter(line for line in text.splitlines() if line)


def _dead_letters(journal: str) -> tuple[str, ...]:
    with contextlib.closing(journal_file.connect(journal, create=False)) as connection:
        return tuple(
            f"{row.id} {row.name}: {row.error}"
            for row in journal_file.rows(connection, state="dead")
        )


def _books(load: Load, runs: Counter[str], dead_letters: tuple[str, ...]) -> CrashBooks:
    claimed = set(load.durable)
    lost = tuple(sorted(key for key in claimed if not runs[key]))
    return CrashBooks(
        claimed=len(claimed),
        ran=len(claimed) - len(lost),
        lost=lost,
        ran_twice=sum(runs[key] - 1 for key in claimed if runs[key] > 1),
        unclaimed_runs=sum(count for key, count in runs.items() if key not in claimed),
        dead_letters=dead_letters,
    )


def _problems(lives: _Lives, books: CrashBooks | None) -> list[str]:
    problems = []
    if books is not None:
        if books.claimed == 0:
            problems.append(
                f"no answered response named a durable task ({DURABLE_HEADER}): there was "
                f"nothing to check; does the app add durable tasks when {LEDGER_ENV} is set?"
            )
        if books.lost:
            problems.append(
                f"{len(books.lost)} durable task(s) named by answered requests never ran "
                f"to the end (any that failed every attempt are dead letters in the "
                f"journal: python -m trio_bg journal ls): "
                f"{', '.join(books.lost[:10])}{' ...' if len(books.lost) > 10 else ''}"
            )
        if lives.planted is not None and not any(
            letter.startswith(f"{lives.planted} ") for letter in books.dead_letters
        ):
            problems.append(
                f"--poison: task {lives.planted}, which cannot be read, is no dead letter"
            )
        if lives.poison is not None and not any(
            f" {lives.poison}: " in letter and "its process died" in letter
            for letter in books.dead_letters
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
    lines = [
        f"trio_bg crash drill of {plan.app}: {plan.requests} requests from "
        f"{plan.concurrency} clients{f' at {plan.rate:g}/s' if plan.rate else ''}, SIGKILL "
        f"after {plan.signal_after:g}s, journal {plan.journal}"
        f"{', poisoned mid-load' if plan.poison else ''}",
        "",
    ]

    row = row_writer(lines, 26)

    lines.append("  first life (killed)")
    row("requests sent", load.sent, f"of {plan.requests}")
    row("answered", load.answered)
    row("refused (503)", load.refused)
    row("failed", load.failed, "cut off by the kill, mostly")
    if result.killed_after is not None:
        row("SIGKILL after", f"{result.killed_after:.2f}s", "of load")
    lines.append("  second life (the same journal)")
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
        lines.append("  durable tasks, across both lives")
        row("claimed by answers", books.claimed, f"named in {DURABLE_HEADER}")
        row("ran at least once", books.ran)
        row("lost", len(books.lost))
        row("extra runs", books.ran_twice, "at least once: ended just before the kill")
        row("ran, unclaimed", books.unclaimed_runs, "stored, but the answer was cut off")
        row("dead letters", len(books.dead_letters), "python -m trio_bg journal ls")
        lines.extend(f"      {letter}" for letter in books.dead_letters[:10])
    lines.append("")
    for problem in result.problems:
        lines.append(f"  PROBLEM: {problem}")
    if result.problems and result.server_log_tail:
        lines.append("  the server's last log lines:")
        lines.extend(f"    | {line}" for line in result.server_log_tail)
    verdict = (
        "PASS: every durable task an answered request named ran at least once"
        if result.passed
        else f"FAIL: {len(result.problems)} problem(s)"
    )
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)
