"""The shutdown drill: serve an app in a child process, load it, SIGTERM it, check the books."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO, TypeVar

import httpx
import trio

from ._options import DEFAULT_GRACE_PERIOD
from ._report import ShutdownReport, report_from_json
from ._serve import SHUTDOWN_MARGIN

TASKS_HEADER = "x-trio-bg-tasks"
"""The response header through which an app tells the drill how many tasks it added."""

DURABLE_HEADER = "x-trio-bg-durable"
"""The response header through which an app names (space-separated keys) the durable
tasks it added, for the crash drill's books."""

REMOTE_HEADER = "x-trio-bg-remote"
"""The response header through which an app names (space-separated keys) the remote
tasks it handed to streaq workers, for the distributed drill's books."""

LEDGER_ENV = "TRIO_BG_DRILL_LEDGER"
"""The environment variable naming the file where the app's durable tasks append their
key, one line per run: how the crash drill sees runs across the server's two lives (and
the distributed drill, its remote tasks' runs on the workers)."""

STARTUP_TIMEOUT = 20.0
"""Seconds the server may take to accept connections (imports on a busy machine)."""

REQUEST_TIMEOUT = 10.0
KILL_WAIT = 5.0
HYPERCORN_GRACEFUL_TIMEOUT = 3.0  # Hypercorn's default, when the drill does not set one
LOG_TAIL_LINES = 20


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

    def server_env(self, directory: Path) -> dict[str, str] | None:
        """The server's environment: with a journal, it names the ledger in
        ``directory`` where the app's durable tasks note each run (`LEDGER_ENV`)."""
        if self.journal is None:
            return None
        return os.environ | {LEDGER_ENV: str(directory / "ledger")}

    def server_command(self, port: int, report_path: Path) -> list[str]:
        """The ``python -m trio_bg serve`` command line of the server under drill."""
        command = [
            sys.executable,
            "-m",
            "trio_bg",
            "serve",
            self.app,
            f"--bind=127.0.0.1:{port}",
            f"--report-json={report_path}",
            "--log-level=warning",
        ]
        for option, value in (
            ("--grace-period", self.grace_period),
            ("--graceful-timeout", self.graceful_timeout),
            ("--max-running", self.max_running),
            ("--max-pending", self.max_pending),
            ("--journal", self.journal),
            ("--journal-lease", self.journal_lease),
        ):
            if value is not None:
                command.append(f"{option}={value}")
        return command


@dataclass(kw_only=True)
class Load:
    """What the clients saw; counted while the load runs."""

    sent: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    claimed: int = 0
    """Tasks the responses said they added (the sum of their `TASKS_HEADER`)."""
    unclaimed: int = 0
    """Answered responses without a (valid) `TASKS_HEADER`."""
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    durable: list[str] = field(default_factory=list)
    """The keys of the durable tasks that answered responses named (`DURABLE_HEADER`)."""
    remote: list[str] = field(default_factory=list)
    """The keys of the remote tasks that answered responses named (`REMOTE_HEADER`)."""


@dataclass(frozen=True, kw_only=True)
class DrillResult:
    """The outcome of a drill: what the clients saw, the server's report, the verdict."""

    plan: DrillPlan
    load: Load
    report: ShutdownReport | None
    exit_status: int | None
    signal_after: float | None
    """Seconds of load before SIGTERM went out (None: the server never started)."""
    stopped_after: float | None
    """Seconds from SIGTERM to the server's exit (None: it did not exit by the deadline)."""
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    server_log_tail: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True when every task is accounted for and the server stopped in time."""
        return not self.problems

    @property
    def unaccounted(self) -> int | None:
        """Accepted tasks in no final state (None without a report)."""
        report = self.report
        if report is None:
            return None
        ended = report.completed + report.failed + report.timed_out + report.handed_off
        return report.accepted - ended - report.cancelled - report.abandoned

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data, for scripts."""
        load = self.load
        return {
            "app": self.plan.app,
            "verdict": "pass" if self.passed else "fail",
            "problems": list(self.problems),
            "notes": list(self.notes),
            "plan": asdict(self.plan),
            "requests": {
                "planned": self.plan.requests,
                "sent": load.sent,
                "answered": load.answered,
                "refused": load.refused,
                "failed": load.failed,
                "not_sent": self.plan.requests - load.sent,
                "statuses": {str(status): n for status, n in sorted(load.statuses.items())},
                "errors": dict(load.errors),
            },
            "tasks": {
                "claimed": load.claimed if load.answered > load.unclaimed else None,
                "unaccounted": self.unaccounted,
                "report": None if self.report is None else asdict(self.report),
            },
            "server": {
                "signal_after": self.signal_after,
                "stopped_after": self.stopped_after,
                "deadline": self.plan.stop_deadline,
                "exit_status": self.exit_status,
                "log_tail": list(self.server_log_tail),
            },
        }


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


def drill(plan: DrillPlan, *, json_output: bool) -> int:
    """Run the drill, print its outcome on stdout, and return the exit status."""
    return run_and_print(partial(run_drill, plan), format_result, json_output=json_output)


def run_drill(plan: DrillPlan, progress: Progress) -> DrillResult:
    """Serve ``plan.app`` in a child process, load it, SIGTERM it, and check the books.

    Runs its own trio loop; the child process never outlives it. Raises
    `DrillInterrupted` if the drill itself gets SIGINT or SIGTERM.
    """
    with tempfile.TemporaryDirectory(prefix="trio_bg-drill-") as directory:
        report_path = Path(directory, "report.json")
        log_path = Path(directory, "server.log")
        with log_path.open("wb") as log:
            run = trio.run(_drive, plan, progress, log, report_path)
        if run.interrupted_by is not None:
            raise DrillInterrupted(f"the drill was interrupted by {run.interrupted_by}")
        log_tail = tuple(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        report = _read_report(report_path, run.problems) if run.stopped_after is not None else None
    result = DrillResult(
        plan=plan,
        load=run.load,
        report=report,
        exit_status=run.exit_status,
        signal_after=run.signal_after,
        stopped_after=run.stopped_after,
        problems=tuple(run.problems),
        notes=(),
        server_log_tail=log_tail,
    )
    problems, notes = _check_books(result)
    return replace(result, problems=problems, notes=notes)


@dataclass(kw_only=True)
class _Run:
    """What driving the server produced, before the books are checked."""

    load: Load = field(default_factory=Load)
    problems: list[str] = field(default_factory=list)
    exit_status: int | None = None
    signal_after: float | None = None
    stopped_after: float | None = None
    interrupted_by: str | None = None

    def interrupt(self, signal_name: str) -> None:
        self.interrupted_by = signal_name


class DrillInterrupted(Exception):
    """The drill got SIGINT or SIGTERM; its server has been stopped."""


async def _drive(plan: DrillPlan, progress: Progress, log: BinaryIO, report_path: Path) -> _Run:
    """Drive the server; a SIGINT or SIGTERM to the drill stops it (and the server)."""
    run = _Run()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_interrupt_on_signal, signals, nursery.cancel_scope, run.interrupt)
            await _drive_server(plan, progress, log, report_path, run)
            nursery.cancel_scope.cancel()
    return run


async def _interrupt_on_signal(
    signals: AsyncIterator[int], scope: trio.CancelScope, note: Callable[[str], None]
) -> None:
    async for number in signals:
        note(signal.Signals(number).name)
        scope.cancel()
        return


async def _drive_server(
    plan: DrillPlan, progress: Progress, log: BinaryIO, report_path: Path, run: _Run
) -> None:
    """Start the server, wait until it listens, load it, SIGTERM it, wait for it."""
    port = _free_port()
    process = await trio.lowlevel.open_process(
        plan.server_command(port, report_path),
        env=plan.server_env(report_path.parent),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # a Ctrl+C meant for the drill is not the server's
    )
    try:
        startup_problem = await _wait_until_listening(process, port)
        if startup_problem is not None:
            run.problems.append(startup_problem)
            return
        progress.milestone(f"drill: serving {plan.app} on 127.0.0.1:{port} (pid {process.pid})")
        run.signal_after, run.stopped_after = await _load_and_stop(
            plan, process, port, run.load, progress
        )
        if run.stopped_after is None:
            run.problems.append(
                f"the server did not stop within {plan.stop_deadline:g}s of SIGTERM (it was "
                f"killed); if that is shorter than its grace period, raise --deadline"
            )
    finally:
        await _reap(process)
        run.exit_status = process.returncode


def _check_books(result: DrillResult) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The drill's problems (those found so far, and the books') and notes."""
    load, report = result.load, result.report
    problems = list(result.problems)
    notes: list[str] = []
    if result.stopped_after is not None and result.exit_status not in (0, 1):
        problems.append(f"the server exited with status {result.exit_status}")
    if result.signal_after is not None and load.answered == 0:
        problems.append("no request was answered: there was nothing to check")
    if report is not None:
        if unaccounted := result.unaccounted:
            problems.append(
                f"{unaccounted} accepted task(s) unaccounted for: not completed, failed, "
                f"timed out, cancelled or abandoned"
            )
        if load.answered == load.unclaimed:
            notes.append(
                f"no response carried {TASKS_HEADER}: could not check that each answered "
                f"request had its tasks accepted"
            )
        else:
            if load.unclaimed:
                notes.append(
                    f"{load.unclaimed} response(s) had no valid {TASKS_HEADER}: their tasks "
                    f"were not checked"
                )
            # A remote task Redis lost and the journal handed off again is accepted
            # once more: one task, not two.
            lost = load.claimed - (report.accepted - report.resent)
            if lost > 0:
                problems.append(
                    f"{lost} task(s) lost: {load.answered - load.unclaimed} responses claimed "
                    f"{load.claimed} ({TASKS_HEADER}), the server accepted {report.accepted}: "
                    f"the app ran or dropped work outside the background nursery"
                )
            elif lost < 0:
                notes.append(
                    f"the server accepted {-lost} task(s) more than the responses claimed "
                    f"(requests whose response the client did not get, or tasks started "
                    f"outside requests)"
                )
    return tuple(problems), tuple(notes)


async def _wait_until_listening(process: trio.Process, port: int) -> str | None:
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


async def _load_and_stop(
    plan: DrillPlan,
    process: trio.Process,
    port: int,
    load: Load,
    progress: Progress,
    stop: signal.Signals = signal.SIGTERM,
    alongside: Callable[[], Awaitable[object]] | None = None,
) -> tuple[float, float | None]:
    """Send the load, signal the server part-way (``stop``), and wait for it to exit.
    Return when the signal went out (seconds of load) and how long the server took to
    stop (None: it did not by the deadline, and was killed). ``alongside`` runs with
    the load from its start; the signal waits for it to return."""
    start = trio.current_time()
    all_sent = trio.Event()
    stop_sending = trio.Event()
    signal_sent_at: float | None = None

    def render() -> str:
        line = (
            f"{trio.current_time() - start:5.1f}s  requests: {load.sent}/{plan.requests} sent, "
            f"{load.answered} answered, {load.refused} refused, {load.failed} failed"
        )
        if signal_sent_at is not None:
            line += f"  |  {stop.name} sent {trio.current_time() - signal_sent_at:.1f}s ago"
        return line

    async with (
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=REQUEST_TIMEOUT,
            limits=httpx.Limits(max_connections=plan.concurrency),
            trust_env=False,  # never a proxy on the way to loopback
        ) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(progress.run, render)
        nursery.start_soon(_send_load, plan, client, load, stop_sending, all_sent)
        if alongside is not None:
            done = trio.Event()
            nursery.start_soon(_then_set, alongside, done)
        with trio.move_on_after(plan.signal_after):
            await all_sent.wait()
        if alongside is not None:
            await done.wait()
        stop_sending.set()  # requests under way finish; no new ones start
        process.send_signal(stop)
        signal_sent_at = trio.current_time()
        progress.milestone(
            f"drill: {stop.name} sent after {signal_sent_at - start:.2f}s, {load.sent} requests"
        )
        stopped_after: float | None = None
        with trio.move_on_after(plan.stop_deadline):
            await process.wait()
            stopped_after = trio.current_time() - signal_sent_at
        if stopped_after is None:
            process.kill()
            progress.milestone(f"drill: the server did not stop within {plan.stop_deadline:g}s")
        else:
            progress.milestone(
                f"drill: the server exited with status {process.returncode} after "
                f"{stopped_after:.2f}s"
            )
        await all_sent.wait()  # every request under way has ended (bounded by its timeout)
        nursery.cancel_scope.cancel()
    return signal_sent_at - start, stopped_after


async def _then_set(run: Callable[[], Awaitable[object]], done: trio.Event) -> None:
    await run()
    done.set()


async def _send_load(
    plan: DrillPlan,
    client: httpx.AsyncClient,
    load: Load,
    stop_sending: trio.Event,
    done: trio.Event,
) -> None:
    """Send up to ``plan.requests`` requests from ``plan.concurrency`` workers; set
    ``done`` once every worker has ended."""
    numbers = iter(range(plan.requests))
    start = trio.current_time()

    def send_time(number: int) -> float:
        return start + number / plan.rate if plan.rate else start

    try:
        async with trio.open_nursery() as workers:
            for _ in range(plan.concurrency):
                workers.start_soon(_worker, client, load, numbers, send_time, stop_sending)
    finally:
        done.set()


async def _worker(
    client: httpx.AsyncClient,
    load: Load,
    numbers: Iterator[int],
    send_time: Callable[[int], float],
    stop_sending: trio.Event,
) -> None:
    for number in numbers:
        await trio.sleep_until(send_time(number))
        if stop_sending.is_set():
            return
        load.sent += 1
        try:
            response = await client.get("/")
        except httpx.HTTPError as error:
            load.failed += 1
            load.errors[type(error).__name__] += 1
            continue
        load.statuses[response.status_code] += 1
        if response.status_code == 503:
            load.refused += 1
            continue
        load.answered += 1
        load.durable.extend(response.headers.get(DURABLE_HEADER, "").split())
        load.remote.extend(response.headers.get(REMOTE_HEADER, "").split())
        claimed = response.headers.get(TASKS_HEADER, "")
        if claimed.isdigit():
            load.claimed += int(claimed)
        else:
            load.unclaimed += 1


async def _reap(process: trio.Process) -> None:
    """Make sure the server is gone, whatever happened to the drill."""
    if process.returncode is None:
        process.kill()
    with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT):
        await process.wait()


def _read_report(path: Path, problems: list[str]) -> ShutdownReport | None:
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- the table -----------------------------------------------------------------------


def _grace(plan: DrillPlan) -> str:
    """The grace period, as the table says it."""
    if plan.grace_period is None:
        return "the app's own grace period"
    return f"grace period {plan.grace_period:g}s"


def row_writer(lines: list[str], width: int) -> Callable[..., None]:
    """``row(label, value, comment="")``: one line of a drill's table, added to ``lines``."""

    def row(label: str, value: object, comment: str = "") -> None:
        lines.append(f"    {label:<{width}}{value!s:>8}  {comment}".rstrip())

    return row


def request_rows(row: Callable[..., None], load: Load, requests: int, *, sent: str) -> None:
    """The rows every drill starts with: requests ``sent`` (its label), answered,
    refused, and failed, naming the errors."""
    row(sent, load.sent, f"of {requests}")
    row("answered", load.answered)
    row("refused (503)", load.refused)
    errors = ", ".join(f"{name} x{n}" for name, n in load.errors.most_common())
    row("failed", load.failed, errors)


def format_result(result: DrillResult) -> str:
    """The drill's outcome as a table, for people."""
    plan, load, report = result.plan, result.load, result.report
    lines = [
        f"trio_bg drill of {plan.app}: {plan.requests} requests from {plan.concurrency} "
        f"clients{f' at {plan.rate:g}/s' if plan.rate else ''}, SIGTERM after "
        f"{plan.signal_after:g}s, {_grace(plan)}",
        "",
    ]

    row = row_writer(lines, 22)

    lines.append("  requests")
    request_rows(row, load, plan.requests, sent="sent")
    lines.append("  tasks")
    if load.answered > load.unclaimed:
        row("claimed by responses", load.claimed, f"sum of {TASKS_HEADER}")
    if report is None:
        row("accepted", "?", "no report from the server")
    else:
        row("accepted", report.accepted)
        row("completed", report.completed)
        row("failed", report.failed)
        row("timed out", report.timed_out)
        row("cancelled", report.cancelled)
        row("abandoned", report.abandoned)
        row("discarded", report.discarded, "their request failed (503, error); never ran")
        row("unaccounted", result.unaccounted)
    lines.append("  server")
    if result.signal_after is not None:
        row("SIGTERM after", f"{result.signal_after:.2f}s", "of load")
    if report is not None:
        row("drain", f"{report.duration:.2f}s", _grace(plan))
    if result.stopped_after is not None:
        row(
            "stopped after",
            f"{result.stopped_after:.2f}s",
            f"deadline {plan.stop_deadline:g}s; exit status {result.exit_status}",
        )
    if report is not None and report.unfinished:
        cut = Counter(report.unfinished)
        lines.append("")
        lines.append("  cut short: " + ", ".join(f"{name} x{n}" for name, n in cut.most_common()))
    lines.append("")
    for note in result.notes:
        lines.append(f"  note: {note}")
    for problem in result.problems:
        lines.append(f"  PROBLEM: {problem}")
    server_failed = report is None or result.exit_status not in (0, 1)
    if result.problems and server_failed and result.server_log_tail:
        lines.append("  the server's last log lines:")
        lines.extend(f"    | {line}" for line in result.server_log_tail)
    if result.passed:
        verdict = "PASS: every accepted task is accounted for"
        if load.answered > load.unclaimed:
            verdict += ", and every answered request had its tasks accepted"
    else:
        verdict = f"FAIL: {len(result.problems)} problem(s)"
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)
