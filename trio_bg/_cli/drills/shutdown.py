"""The shutdown drill: serve an app in a child process, load it, SIGTERM it, check the books."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from ..._engine.report import ShutdownReport
from .harness import (
    DrillPlan,
    Progress,
    Table,
    drill_directory,
    read_report,
    run_and_print,
    run_logged,
    served,
    verdict_json,
)
from .load import TASKS_HEADER, load_and_stop
from .outcome import DriveRecord, ServerDrillResult


@dataclass(frozen=True, kw_only=True)
class DrillResult(ServerDrillResult):
    """The outcome of a drill: what the clients saw, the server's report, the verdict
    (passed: every task is accounted for and the server stopped in time)."""

    signal_after: float | None
    """Seconds of load before SIGTERM went out (None: the server never started)."""
    stopped_after: float | None
    """Seconds from SIGTERM to the server's exit (None: it did not exit by the deadline)."""
    notes: tuple[str, ...]

    @classmethod
    def of(
        cls,
        plan: DrillPlan,
        run: ServerRun,
        report: ShutdownReport | None,
        log_tail: tuple[str, ...] = (),
    ) -> DrillResult:
        """What ``run`` came to, the books checked."""
        result = cls(
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

    @property
    def unaccounted(self) -> int | None:
        """Accepted tasks in no final state (None without a report)."""
        report = self.report
        if report is None:
            return None
        ended = report.completed + report.failed + report.timed_out + report.handed_off
        return report.accepted - ended - report.cancelled - report.abandoned

    def server_json(self) -> dict[str, Any]:
        """When the server got its signal and stopped, as JSON data."""
        return {
            "signal_after": self.signal_after,
            "stopped_after": self.stopped_after,
            "deadline": self.plan.stop_deadline,
            "exit_status": self.exit_status,
        }

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data, for scripts."""
        load, plan = self.load, self.plan
        return verdict_json(plan.app, self.problems, self.notes) | {
            "plan": asdict(plan),
            "requests": {
                "planned": plan.requests,
                **load.counts(),
                "not_sent": plan.requests - load.sent,
                **load.seen(),
            },
            "tasks": {
                "claimed": load.claimed if load.claims else None,
                "unaccounted": self.unaccounted,
                "report": None if self.report is None else asdict(self.report),
            },
            "server": self.server_json() | {"log_tail": list(self.server_log_tail)},
        }


def drill(plan: DrillPlan, *, json_output: bool) -> int:
    """Run the drill, print its outcome on stdout, and return the exit status."""
    return run_and_print(partial(run_drill, plan), format_result, json_output=json_output)


def run_drill(plan: DrillPlan, progress: Progress) -> DrillResult:
    """Serve ``plan.app`` in a child process, load it, SIGTERM it, and check the books.

    Runs its own trio loop; the child process never outlives it. Raises
    `DrillInterrupted` if the drill itself gets SIGINT or SIGTERM.
    """
    with drill_directory("trio_bg-drill-") as directory:
        run, log_tail = run_logged(directory, partial(_drive, plan, progress, directory))
        report = None
        if run.stopped_after is not None:
            report = read_report(directory / "report.json", run.problems)
    return DrillResult.of(plan, run, report, log_tail)


@dataclass(kw_only=True)
class ServerRun(DriveRecord):
    """What driving the server produced, before the books are checked."""

    signal_after: float | None = None
    stopped_after: float | None = None


async def _drive(plan: DrillPlan, progress: Progress, directory: Path, log: BinaryIO) -> ServerRun:
    """Start the server, wait until it listens, load it, SIGTERM it, wait for it."""
    run = ServerRun()
    async with served(plan, directory, directory / "report.json", log) as server:
        if server.problem is not None:
            run.problems.append(server.problem)
        else:
            progress.milestone(
                f"drill: serving {plan.app} on 127.0.0.1:{server.port} (pid {server.process.pid})"
            )
            run.signal_after, run.stopped_after = await load_and_stop(
                plan, server.process, server.port, run.load, progress
            )
            if run.stopped_after is None:
                run.problems.append(stopped_late("the server", plan))
    run.exit_status = server.process.returncode
    return run


def stopped_late(what: str, plan: DrillPlan) -> str:
    """The problem of a server (``what``) that did not stop by the deadline."""
    return (
        f"{what} did not stop within {plan.stop_deadline:g}s of SIGTERM (it was killed); "
        f"if that is shorter than its grace period, raise --deadline"
    )


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
        if not load.claims:
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


def format_result(result: DrillResult) -> str:
    """The drill's outcome as a table, for people."""
    plan, load, report = result.plan, result.load, result.report
    table = Table(f"trio_bg drill of {plan.app}: {plan.load_title('SIGTERM')}, {plan.grace}", 22)
    row = table.row
    table.section("requests")
    table.requests(load, plan.requests, sent="sent")
    table.section("tasks")
    if load.claims:
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
    table.section("server")
    if result.signal_after is not None:
        row("SIGTERM after", f"{result.signal_after:.2f}s", "of load")
    if report is not None:
        row("drain", f"{report.duration:.2f}s", plan.grace)
    if result.stopped_after is not None:
        row(
            "stopped after",
            f"{result.stopped_after:.2f}s",
            f"deadline {plan.stop_deadline:g}s; exit status {result.exit_status}",
        )
    if report is not None and report.unfinished:
        cut = Counter(report.unfinished)
        table.lines.append("")
        table.lines.append(
            "  cut short: " + ", ".join(f"{name} x{n}" for name, n in cut.most_common())
        )
    logs = result.server_logs(server_failed=report is None or result.exit_status not in (0, 1))
    passed = "every accepted task is accounted for"
    if load.claims:
        passed += ", and every answered request had its tasks accepted"
    return table.end(passed, result.problems, result.notes, logs)
