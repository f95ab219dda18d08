"""What every drill shares: the plan, the server processes, the signals that interrupt
the drill, its temporary directory, the ledger of task runs, and the report's table."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO, TypeVar

import trio

from ..._engine.report import ShutdownReport, report_from_json
from ..._running.option_table import (
    DEFAULT_GRACE_PERIOD,
    DRILL_FLAGS,
    HYPERCORN_GRACEFUL_TIMEOUT,
    given_flags,
)
from ..._web.serve import SHUTDOWN_MARGIN
from .load import Load

LEDGER_ENV = "TRIO_BG_DRILL_LEDGER"
"""The environment variable naming the file where the app's durable tasks append their
key, one line per run: how the crash drill sees runs across the server's two lives (and
the distributed drill, its remote tasks' runs on the workers)."""

STARTUP_TIMEOUT = 20.0
"""Seconds the server may take to accept connections (imports on a busy machine)."""

KILL_WAIT = 5.0
LOG_TAIL_LINES = 20

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class DrillPlan:
    """What to drill, and how: the ``drill`` command's options."""

    app: str
    requests: int = 400
    concurrency: int = 10
    rate: float = 100.0
    """Requests per second, all clients together (0: as fast as they go)."""
    signal_after: float = 2.0
    grace_period: float | None = None
    """None: the app's own (the middleware's default, unless the app was wrapped in code)."""
    graceful_timeout: float | None = None
    max_running: int | None = None
    max_pending: int | None = None
    deadline: float | None = None
    journal: str | None = None
    journal_lease: float | None = None
    kill: bool = False
    """The crash drill: SIGKILL instead of SIGTERM, then a second life on the journal."""
    poison: bool = False
    """The crash drill plants poisoned tasks mid-load (see `_crash_drill`)."""

    @property
    def stop_deadline(self) -> float:
        """Seconds the server may take to exit after SIGTERM."""
        if self.deadline is not None:
            return self.deadline
        graceful = self.graceful_timeout
        if graceful is None:
            graceful = HYPERCORN_GRACEFUL_TIMEOUT
        grace_period = DEFAULT_GRACE_PERIOD if self.grace_period is None else self.grace_period
        return graceful + grace_period + SHUTDOWN_MARGIN

    @property
    def grace(self) -> str:
        """The grace period, as the tables say it."""
        if self.grace_period is None:
            return "the app's own grace period"
        return f"grace period {self.grace_period:g}s"

    def load_title(self, stop: str) -> str:
        """The load, and when the server gets ``stop``: for a table's title."""
        rate = f" at {self.rate:g}/s" if self.rate else ""
        return (
            f"{self.requests} requests from {self.concurrency} clients{rate}, {stop} after "
            f"{self.signal_after:g}s"
        )

    def server_env(self, directory: Path) -> dict[str, str] | None:
        """The server's environment: with a journal, it names the ledger in
        ``directory`` where the app's durable tasks note each run (`LEDGER_ENV`)."""
        if self.journal is None:
            return None
        return os.environ | {LEDGER_ENV: str(directory / "ledger")}

    def server_command(self, port: int, report_path: Path) -> list[str]:
        """The ``python -m trio_bg serve`` command line of the server under drill."""
        return [
            sys.executable,
            "-m",
            "trio_bg",
            "serve",
            self.app,
            f"--bind=127.0.0.1:{port}",
            f"--report-json={report_path}",
            "--log-level=warning",
            *given_flags(self, DRILL_FLAGS),
        ]


class Progress:
    """Shows the drill as it runs: milestones as lines, and the load's counts on one
    updating line on a terminal (otherwise on a line a second)."""

    def __init__(self, stream: TextIO) -> None:
        """Write to ``stream``."""
        self._stream = stream
        self._tty = stream.isatty()

    def milestone(self, text: str) -> None:
        """Show ``text`` on a line of its own."""
        self._stream.write(f"\r\x1b[K{text}\n" if self._tty else f"{text}\n")
        self._stream.flush()

    async def run(self, render: Callable[[], str]) -> None:
        """Show ``render()`` periodically until cancelled."""
        try:
            while True:
                await trio.sleep(0.1 if self._tty else 1.0)
                if self._tty:
                    self._stream.write(f"\r\x1b[K{render()}")
                else:
                    self._stream.write(f"{render()}\n")
                self._stream.flush()
        finally:
            if self._tty:
                self._stream.write("\r\x1b[K")
                self._stream.flush()


class DrillOutcome(Protocol):
    """What every drill's result offers its command."""

    @property
    def passed(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...


Outcome = TypeVar("Outcome", bound=DrillOutcome)


class DrillInterrupted(Exception):
    """The drill got SIGINT or SIGTERM; the processes it started have been stopped."""


def run_and_print(
    run: Callable[[Progress], Outcome],
    formatted: Callable[[Outcome], str],
    *,
    json_output: bool,
    stopped: str = "its server was stopped",
) -> int:
    """Run a drill, print its outcome on stdout (as text or JSON), and return the exit
    status: 0 passed, 1 failed, 130 interrupted (``stopped`` says what was cleaned up)."""
    try:
        result = run(Progress(sys.stderr))
    except DrillInterrupted as interrupted:
        print(f"{interrupted}; {stopped}", file=sys.stderr)
        return 130
    print(json.dumps(result.to_json(), indent=2) if json_output else formatted(result))
    return 0 if result.passed else 1


@contextmanager
def drill_directory(prefix: str) -> Iterator[Path]:
    """A temporary directory for the drill's files, gone once the drill is."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


def run_interruptible(drive: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(drive)``; a SIGINT or SIGTERM to the drill cancels it (and so stops
    what it started), then raises `DrillInterrupted`."""
    interrupted_by: list[str] = []
    driven: list[T] = []

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                scope = nursery.cancel_scope
                nursery.start_soon(_interrupt_on_signal, signals, scope, interrupted_by)
                driven.append(await drive())
                nursery.cancel_scope.cancel()

    trio.run(main)
    if interrupted_by:
        raise DrillInterrupted(f"the drill was interrupted by {interrupted_by[0]}")
    return driven[0]


async def _interrupt_on_signal(
    signals: AsyncIterator[int], scope: trio.CancelScope, interrupted_by: list[str]
) -> None:
    async for number in signals:
        interrupted_by.append(signal.Signals(number).name)
        scope.cancel()
        return


def run_logged(
    directory: Path, drive: Callable[[BinaryIO], Awaitable[T]]
) -> tuple[T, tuple[str, ...]]:
    """`run_interruptible`, the servers' output going to a log in ``directory``;
    return what ``drive(log)`` returned and the log's last lines."""
    log_path = directory / "server.log"
    with log_path.open("wb") as log:
        driven = run_interruptible(lambda: drive(log))
    return driven, tuple(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


@dataclass(frozen=True)
class Server:
    """A server under drill: its process, its port, and why it does not listen (None:
    it does)."""

    process: trio.Process
    port: int
    problem: str | None


@asynccontextmanager
async def served(
    plan: DrillPlan, directory: Path, report_path: Path, log: BinaryIO
) -> AsyncIterator[Server]:
    """Start the server under drill (its output to ``log``) and wait until it listens;
    it is gone (killed if need be) once the block ends."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        plan.server_command(port, report_path),
        env=plan.server_env(directory),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # a Ctrl+C meant for the drill is not the server's
    )
    try:
        yield Server(process, port, await wait_until_listening(process, port))
    finally:
        await reap(process)


async def wait_until_listening(process: trio.Process, port: int) -> str | None:
    """Wait until the server accepts connections; return a problem, or None."""
    with trio.move_on_after(STARTUP_TIMEOUT):
        while process.poll() is None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return None
        return f"the server exited during startup with status {process.returncode}"
    return f"the server did not accept connections within {STARTUP_TIMEOUT:g}s"


async def reap(process: trio.Process) -> None:
    """Make sure ``process`` is gone, whatever happened to the drill."""
    if process.returncode is None:
        process.kill()
    with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT):
        await process.wait()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def read_report(path: Path, problems: list[str]) -> ShutdownReport | None:
    """The server's shutdown report at ``path``; None, with a problem, if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append("the server wrote no shutdown report")
        return None
    except ValueError as error:
        problems.append(f"the server's shutdown report is not JSON: {error}")
        return None
    try:
        return report_from_json(data)
    except (KeyError, TypeError) as error:
        problems.append(f"the server's shutdown report is malformed: {error}")
        return None


def read_ledger(path: Path) -> Counter[str]:
    """The ledger's lines (`LEDGER_ENV`), counted; none if it is not there."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Counter()
    return Counter(line for line in text.splitlines() if line)


@dataclass(frozen=True)
class Ledger:
    """The ledger's lines: ``KEY started PID`` when a run starts, ``KEY ran PID`` (or
    ``KEY``) when it ends."""

    runs: Counter[str]
    """Ended runs, by task key."""
    started: Counter[tuple[str, int]]
    ended: Counter[tuple[str, int]]

    @classmethod
    def parse(cls, lines: Counter[str]) -> Ledger:
        """Read the ledger's ``lines`` (counted)."""
        runs: Counter[str] = Counter()
        started: Counter[tuple[str, int]] = Counter()
        ended: Counter[tuple[str, int]] = Counter()
        for line, count in lines.items():
            match line.split():
                case [key, "started", pid] if pid.isdigit():
                    started[key, int(pid)] += count
                case [key, "ran", pid] if pid.isdigit():
                    ended[key, int(pid)] += count
                    runs[key] += count
                case [key, *_]:
                    runs[key] += count
        return cls(runs, started, ended)

    def ran_by(self, pid: int) -> int:
        """Runs that ended in process ``pid``."""
        return sum(count for (_, by), count in self.ended.items() if by == pid)

    def unfinished_by(self, pid: int) -> int:
        """Runs that started in process ``pid`` and did not end there."""
        return sum(
            max(0, count - self.ended[key, by])
            for (key, by), count in self.started.items()
            if by == pid
        )


@dataclass(frozen=True, kw_only=True)
class Books:
    """The tasks answered responses named, against the runs the ledger holds."""

    claimed: int
    ran: int
    """Of those, the ones that ran to the end at least once."""
    lost: tuple[str, ...]
    """The keys of those that never did."""
    extra_runs: int
    """Runs beyond the first of claimed tasks (at least once: a run whose end was not
    recorded, cut off by a kill, runs again)."""
    unclaimed_runs: int
    """Runs of tasks no answered response named (stored or handed off, but the
    answer was cut off or not received)."""

    @classmethod
    def of(cls, named: Sequence[str], runs: Counter[str]) -> Books:
        """The books of the tasks ``named``, for ``runs`` by task key."""
        claimed = set(named)
        lost = tuple(sorted(key for key in claimed if not runs[key]))
        return cls(
            claimed=len(claimed),
            ran=len(claimed) - len(lost),
            lost=lost,
            extra_runs=sum(runs[key] - 1 for key in claimed if runs[key] > 1),
            unclaimed_runs=sum(n for key, n in runs.items() if key not in claimed),
        )

    def problems(self, kind: str, header: str, question: str, where: str = "") -> list[str]:
        """Nothing claimed (``question``: does the app ...?), and the ``kind`` tasks lost
        (``where``: where to look for them)."""
        problems = []
        if self.claimed == 0:
            problems.append(
                f"no answered response named a {kind} task ({header}): there was nothing to "
                f"check; does the app {question}?"
            )
        if self.lost:
            problems.append(
                f"{len(self.lost)} {kind} task(s) named by answered requests never ran to the "
                f"end{where}: {', '.join(self.lost[:10])}{' ...' if len(self.lost) > 10 else ''}"
            )
        return problems

    def to_json(self, ran: str, extra_runs: str) -> dict[str, Any]:
        """The books as JSON data (``ran``, ``extra_runs``: the drill's names for them)."""
        return {
            "claimed": self.claimed,
            ran: self.ran,
            "lost": list(self.lost),
            extra_runs: self.extra_runs,
            "unclaimed_runs": self.unclaimed_runs,
        }

    def rows(self, table: Table, header: str, ran: str, extra: str, unclaimed: str) -> None:
        """The books' rows: ``ran`` labels the tasks that ran; the others explain."""
        table.row("claimed by answers", self.claimed, f"named in {header}")
        table.row(ran, self.ran)
        table.row("lost", len(self.lost))
        table.row("extra runs", self.extra_runs, extra)
        table.row("ran, unclaimed", self.unclaimed_runs, unclaimed)


def verdict_json(app: str, problems: Sequence[str], notes: Sequence[str] | None) -> dict[str, Any]:
    """The JSON result's first fields (``notes`` None: the drill has none)."""
    head = {"app": app, "verdict": "fail" if problems else "pass", "problems": list(problems)}
    return head if notes is None else head | {"notes": list(notes)}


class Table:
    """A drill's outcome as a table, for people: a title, sections of rows, then the
    notes, the problems, log lines, and the verdict."""

    def __init__(self, title: str, width: int) -> None:
        """Start with ``title``; labels take ``width`` characters."""
        self.lines = [title, ""]
        self._width = width

    def section(self, name: str) -> None:
        """Start a section."""
        self.lines.append(f"  {name}")

    def row(self, label: str, value: object, comment: str = "") -> None:
        """One line of a section."""
        self.lines.append(f"    {label:<{self._width}}{value!s:>8}  {comment}".rstrip())

    def requests(self, load: Load, requests: int, *, sent: str, failed: str | None = None) -> None:
        """The rows every drill starts with: requests ``sent`` (its label), answered,
        refused, and failed (``failed`` its comment; by default the errors)."""
        self.row(sent, load.sent, f"of {requests}")
        self.row("answered", load.answered)
        self.row("refused (503)", load.refused)
        if failed is None:
            failed = ", ".join(f"{name} x{n}" for name, n in load.errors.most_common())
        self.row("failed", load.failed, failed)

    def end(
        self,
        passed: str,
        problems: Sequence[str],
        notes: Sequence[str] = (),
        logs: Mapping[str, Sequence[str]] | None = None,
    ) -> str:
        """The table, ended by the notes, the problems, the ``logs`` (lines under each
        heading) and the verdict (``passed`` says what passing means)."""
        self.lines.append("")
        self.lines.extend(f"  note: {note}" for note in notes)
        self.lines.extend(f"  PROBLEM: {problem}" for problem in problems)
        for heading, tail in (logs or {}).items():
            self.lines.append(f"  {heading}:")
            self.lines.extend(f"    | {line}" for line in tail)
        verdict = f"FAIL: {len(problems)} problem(s)" if problems else f"PASS: {passed}"
        self.lines.append(f"  verdict: {verdict}")
        return "\n".join(self.lines)
