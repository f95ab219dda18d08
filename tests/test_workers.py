"""``python -m trio_bg serve --workers 2``: real processes, real signals.

The server serves ``worker_app:app`` (from this directory): one worker's tasks are long,
the other's short, so on SIGTERM one worker is still draining after the other is done:
what Hypercorn's own ``-w 2`` cuts short. Every wait is bounded by
``trio.fail_after(BOUND)``; the server runs in a session of its own, and its whole
process group is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from trio_bg._cli.supervisor import MIN_UPTIME
from trio_bg._web.middleware import Receive, Scope, Send

BOUND = 15.0
"""Seconds any single wait may take before the test fails (generous: a noisy machine)."""

TESTS = Path(__file__).parent
MAX_REQUESTS = 300


@dataclass
class Server:
    """``python -m trio_bg serve worker_app:app --workers 2``, and the answers it gave."""

    process: trio.Process
    url: str
    report_path: Path
    log_path: Path
    answers: Counter[tuple[int, str]] = field(default_factory=Counter)  # (pid, role): count

    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_for_log(self, pattern: str, *, running: bool = True) -> re.Match[str]:
        """Return once ``pattern`` is in the log (the caller bounds the wait), failing
        at once if the server exits first (``running``)."""
        while (match := re.search(pattern, self.log())) is None:
            assert not running or self.process.poll() is None, f"it exited:\n{self.log()}"
            await trio.sleep(0.02)
        return match

    def pid(self, role: str) -> int:
        return next(pid for pid, answered in self.answers if answered == role)

    def answered(self, pid: int) -> int:
        return sum(count for (answerer, _), count in self.answers.items() if answerer == pid)

    def answered_as(self, role: str) -> int:
        return sum(count for (_, answerer), count in self.answers.items() if answerer == role)

    async def load(self, enough: int, *, until_pid: int | None = None) -> None:
        """Send requests, each on a new connection, four at a time, until both roles
        (or ``until_pid``) answered ``enough`` times; at most `MAX_REQUESTS`."""
        sent = 0

        def done() -> bool:
            if until_pid is not None:
                return self.answered(until_pid) >= enough
            return min(self.answered_as("long"), self.answered_as("short")) >= enough

        async def client() -> None:
            nonlocal sent
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=BOUND) as http:
                while not done():
                    assert sent < MAX_REQUESTS, f"not enough answers: {self.answers}"
                    sent += 1
                    response = await http.get(self.url)
                    assert response.headers["x-trio-bg-tasks"] == "1"
                    answer = response.json()
                    self.answers[answer["pid"], answer["role"]] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(client)

    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.report_path.read_text())
        return data


@asynccontextmanager
async def running(tmp_path: Path, app: str, *, long: float) -> AsyncIterator[Server]:
    """Start ``serve APP --workers=2`` on a free port; kill its process group at the end."""
    roles = tmp_path / "roles"
    roles.mkdir()
    environment = os.environ | {
        "TRIO_BG_TEST_ROLES": str(roles),
        "TRIO_BG_TEST_LONG": str(long),
        "TRIO_BG_TEST_SHORT": "0.1",
        "TRIO_BG_TEST_GRACE": "10",
    }
    log_path = tmp_path / "server.log"
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "trio_bg", "serve", app, "--workers=2"]
    command += ["--bind=127.0.0.1:0", f"--report-json={report_path}"]
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            command,
            cwd=TESTS,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: killpg reaches every worker
        )
    try:
        yield Server(process, "", report_path, log_path)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(BOUND):
            await process.wait()


@asynccontextmanager
async def serving(tmp_path: Path, *, long: float) -> AsyncIterator[Server]:
    """`running` ``worker_app:app``, once (a bounded wait) its two workers serve."""
    async with running(tmp_path, "worker_app:app", long=long) as server:
        with trio.fail_after(BOUND):
            served = await server.wait_for_log(r"serving worker_app:app on (\S+) with 2 workers")
        server.url = served[1]
        yield server


def assert_drained(server: Server, status: int) -> None:
    """Exit 0; each worker and the total: every answered request's task completed."""
    log = server.log()
    assert status == 0, log
    report = server.report()
    answered = sum(server.answers.values())
    assert report["accepted"] == report["completed"] == answered, log
    assert (report["cancelled"], report["abandoned"], report["unfinished"]) == (0, 0, [])
    assert {worker["pid"] for worker in report["workers"]} == {pid for pid, _ in server.answers}
    for worker in report["workers"]:
        assert worker["exit_status"] == 0
        assert worker["report"]["accepted"] == worker["report"]["completed"]
        assert worker["report"]["accepted"] == server.answered(worker["pid"])
    # The premise: the long worker was still draining long tasks when the signal came.
    assert re.search(rf"\[{server.pid('long')}\] INFO trio_bg: draining .*: [1-9]\d* running", log)
    assert "cancelling" not in log


async def test_sigterm_to_the_supervisor_waits_for_every_worker_to_drain(tmp_path: Path) -> None:
    async with serving(tmp_path, long=2.0) as server:
        with trio.fail_after(BOUND):
            await server.load(5)
            server.process.send_signal(signal.SIGTERM)
            status = await server.process.wait()
    assert_drained(server, status)
    assert "SIGTERM received: stopping the workers gracefully" in server.log()


async def test_sigterm_to_the_whole_process_group_is_one_graceful_shutdown(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, long=2.0) as server:
        with trio.fail_after(BOUND):
            await server.load(5)
            os.killpg(server.process.pid, signal.SIGTERM)  # as systemd's control-group kill
            status = await server.process.wait()
    assert_drained(server, status)
    # The worker got the signal itself, and the supervisor's stop: one graceful shutdown.
    assert re.search(rf"\[{server.pid('long')}\] INFO trio_bg: SIGTERM received", server.log())


async def test_a_second_signal_cancels_the_workers_tasks_and_exits_1(tmp_path: Path) -> None:
    async with serving(tmp_path, long=60.0) as server:
        with trio.fail_after(BOUND):
            await server.load(5)
            long_pid, short_pid = server.pid("long"), server.pid("short")
            server.process.send_signal(signal.SIGTERM)
            await server.wait_for_log(rf"\[{long_pid}\] INFO trio_bg: draining")
            await server.wait_for_log(rf"\[{short_pid}\] INFO trio_bg: background tasks shut down")
            server.process.send_signal(signal.SIGTERM)
            status = await server.process.wait()
    log = server.log()
    assert status == 1, log
    report = server.report()
    assert report["accepted"] == sum(server.answers.values())
    assert report["cancelled"] == report["accepted"] - report["completed"] > 0
    assert report["unfinished"] == ["work"] * report["cancelled"]
    workers = {worker["pid"]: worker for worker in report["workers"]}
    assert workers[short_pid]["report"]["completed"] == server.answered(short_pid)
    assert workers[long_pid]["report"]["cancelled"] == server.answered(long_pid)
    assert workers[long_pid]["exit_status"] == 1
    assert f"[{long_pid}] WARNING trio_bg: cancel from the supervisor: cancelling" in log


async def test_a_worker_killed_while_serving_is_replaced_and_reported(tmp_path: Path) -> None:
    async with serving(tmp_path, long=0.1) as server:
        with trio.fail_after(BOUND):
            await trio.sleep(MIN_UPTIME)  # a worker that dies sooner is not replaced
            await server.load(1)
            killed = server.pid("long")
            os.kill(killed, signal.SIGKILL)
            replaced = await server.wait_for_log(
                rf"ERROR trio_bg: worker {killed} ended while serving \(killed by SIGKILL\): "
                r"starting a replacement\n(?:.*\n)*?.*INFO trio_bg: worker (\d+) serves"
            )
            replacement = int(replaced[1])
            await server.load(1, until_pid=replacement)
            server.process.send_signal(signal.SIGTERM)
            status = await server.process.wait()
    log = server.log()
    assert status == 3, log
    report = server.report()
    workers = {worker["pid"]: worker for worker in report["workers"]}
    assert len(workers) == 3
    assert workers.pop(killed) == {"pid": killed, "exit_status": -signal.SIGKILL, "report": None}
    assert replacement in workers
    for pid, worker in workers.items():
        assert worker["exit_status"] == 0
        assert worker["report"]["completed"] == server.answered(pid)
    assert report["completed"] == sum(server.answered(pid) for pid in workers)
    assert "1 of 3 worker(s) failed, their tasks unaccounted for" in log


async def failing_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """An app whose lifespan startup fails: no worker ever serves."""
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


async def test_workers_that_cannot_start_are_not_replaced_and_exit_3(tmp_path: Path) -> None:
    async with running(tmp_path, "test_workers:failing_startup", long=0.1) as server:
        with trio.fail_after(BOUND):
            status = await server.process.wait()
    log = server.log()
    assert status == 3, log
    assert re.search(
        r"ERROR trio_bg: worker \d+ ended \S+ after it started, before it served "
        r"\(exit status 3\): not replacing it; stopping",
        log,
    )
    assert "serving test_workers:failing_startup" not in log
    assert "starting a replacement" not in log
    report = server.report()
    assert report["accepted"] == 0
    assert [worker["exit_status"] for worker in report["workers"]] == [3, 3]
    # Each worker's nursery was opened (and shut down, empty) before the startup failed.
    assert [worker["report"]["accepted"] for worker in report["workers"]] == [0, 0]
    assert "2 of 2 worker(s) failed" in log


async def test_workers_whose_supervisor_died_drain_on_their_own(tmp_path: Path) -> None:
    async with serving(tmp_path, long=1.0) as server:
        with trio.fail_after(BOUND):
            await server.load(1)
            server.process.kill()
            await server.process.wait()
            for pid in {pid for pid, _ in server.answers}:
                await server.wait_for_log(
                    rf"\[{pid}\] WARNING trio_bg: the supervisor is gone: shutting down "
                    rf"gracefully\n(?:.*\n)*?.*\[{pid}\] INFO trio_bg: background tasks shut down: "
                    rf"{server.answered(pid)} accepted \({server.answered(pid)} completed\)",
                    running=False,
                )


def test_a_supervisor_that_cannot_bind_exits_3_and_starts_no_worker() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"--bind=127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "trio_bg", "serve", "worker_app:app", "--workers=2", bind],
            cwd=TESTS,
            capture_output=True,
            timeout=BOUND,
            check=False,
        )
    assert result.returncode == 3
    assert b"the server failed: [Errno" in result.stderr
    assert b"started worker" not in result.stderr
