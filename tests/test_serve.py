"""trio_bg.serve and ``python -m trio_bg serve``: signals, drain, report, exit status.

The subprocess tests serve this module's ``app`` (``python -m trio_bg serve
test_serve:app``, run from this directory). Every wait is bounded by
``trio.fail_after(BOUND)``, and every child process is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import trio
from hypercorn.config import Config
from redis_server import RedisServer, redis_server_or_skip

import trio_bg
from trio_bg._keeping import journal_schema as _journal_schema
from trio_bg._web.middleware import Receive, Scope, Send
from trio_bg._web.serve import SHUTDOWN_MARGIN, default_config

BOUND = 15.0
"""Seconds any single wait may take before the test fails (generous: a noisy machine)."""

TESTS = Path(__file__).parent
DRAIN_STARTED = "draining background tasks"  # trio_bg logs it as the shutdown begins


# -- the app the child processes serve -------------------------------------------------


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Each request adds the tasks its query asks for:

    ``tasks=N&sleep=S`` N async sleeps of S seconds; ``threads=N`` as many blocking
    sleeps in worker threads; ``delay=S`` waits S seconds between the response's
    headers and its body, so a client can hold a request in flight; ``exit=1`` a task
    that calls ``sys.exit(0)``.
    """
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    query = {key: values[0] for key, values in parse_qs(scope["query_string"].decode()).items()}
    seconds = float(query.get("sleep", 0))
    tasks = trio_bg.current_tasks()
    for _ in range(int(query.get("tasks", 0))):
        tasks.add_task(trio.sleep, seconds)
    for _ in range(int(query.get("threads", 0))):
        tasks.add_task(time.sleep, seconds)
    if query.get("exit"):
        tasks.add_task(sys.exit, 0)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await trio.sleep(float(query.get("delay", 0)))
    await send({"type": "http.response.body", "body": b"ok"})


def app_failing_in(phase: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An app whose lifespan ``phase`` (startup or shutdown) answers ``failed``."""

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            if kind == phase:
                await send({"type": f"lifespan.{kind}.failed", "message": "the pool is broken"})
                return
            await send({"type": f"lifespan.{kind}.complete"})

    return failing


failing_startup = app_failing_in("startup")
failing_shutdown = app_failing_in("shutdown")


# -- a server in a child process -------------------------------------------------------


@dataclass
class Child:
    """``python -m trio_bg serve`` running in a child process."""

    process: trio.Process
    url: str
    report_path: Path
    log_path: Path

    async def wait_for_log(self, text: str) -> None:
        """Return once ``text`` is in the child's stderr."""
        while text not in await trio.Path(self.log_path).read_text():
            assert self.process.poll() is None, "the server exited"
            await trio.sleep(0.02)

    async def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(await trio.Path(self.report_path).read_text())
        return data


@asynccontextmanager
async def serving(tmp_path: Path, *options: str, app: str = "app") -> AsyncIterator[Child]:
    """Start ``python -m trio_bg serve test_serve:APP`` on a free port; wait (bounded)
    until it accepts connections; kill it on the way out if it still runs."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "trio_bg",
                "serve",
                f"test_serve:{app}",
                f"--bind=127.0.0.1:{port}",
                f"--report-json={tmp_path / 'report.json'}",
                *options,
            ],
            cwd=TESTS,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        with trio.fail_after(BOUND):
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield Child(process, f"http://127.0.0.1:{port}", tmp_path / "report.json", log_path)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(BOUND):
            await process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=BOUND)


# -- the command: signals, drain, report -----------------------------------------------


async def test_sigterm_mid_load_drains_every_task_and_exits_0(tmp_path: Path) -> None:
    async with serving(tmp_path, "--grace-period=5") as server, client(server.url) as http:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(http.get, "/?tasks=2&sleep=0.3")
            # Headers in, body not yet: this request is in flight when SIGTERM comes.
            async with http.stream("GET", "/?tasks=2&threads=1&sleep=0.3&delay=0.3") as response:
                server.process.send_signal(signal.SIGTERM)
                assert await response.aread() == b"ok"
            status = await server.process.wait()
        report = await server.report()
        log = await trio.Path(server.log_path).read_text()

    assert status == 0, log
    assert report.pop("duration") > 0
    assert report == {
        "accepted": 13,
        "completed": 13,
        "failed": 0,
        "timed_out": 0,
        "cancelled": 0,
        "abandoned": 0,
        "discarded": 0,
        "unfinished": [],
        "deferred": 0,
        "recovered": 0,
        "handed_off": 0,
        "outbox": 0,
        "unconfirmed": 0,
        "resent": 0,
        "maybe_lost": 0,
        "lease_lost": 0,
        "unfinished_ids": [],
        "deduplicated": 0,
        "cancelled_on_request": 0,
    }
    assert "SIGTERM received: shutting down gracefully" in log


async def test_a_second_signal_cancels_the_drain_at_once_and_exits_1(tmp_path: Path) -> None:
    async with serving(tmp_path, "--grace-period=60") as server:
        with trio.fail_after(BOUND):
            async with client(server.url) as http:
                await http.get("/?tasks=4&threads=1&sleep=60")
            server.process.send_signal(signal.SIGTERM)
            await server.wait_for_log(DRAIN_STARTED)
            server.process.send_signal(signal.SIGINT)
            status = await server.process.wait()
        report = await server.report()
        log = await trio.Path(server.log_path).read_text()

    assert status == 1, log
    assert report["duration"] < BOUND  # not the 60 s grace period
    assert (report["accepted"], report["completed"]) == (5, 0)
    assert (report["cancelled"], report["abandoned"]) == (4, 1)
    assert report["unfinished"] == ["sleep"] * 5  # trio.sleep x4, time.sleep x1
    assert "SIGINT received again: cancelling the background tasks now" in log


async def test_a_task_raising_system_exit_stops_the_server_after_the_drain_and_exits_3(
    tmp_path: Path,
) -> None:
    """Before: the nursery died, the server served on and answered 503 for ever; a
    later SIGTERM exited 3 with no report."""
    async with serving(tmp_path, "--grace-period=5") as server, client(server.url) as http:
        with trio.fail_after(BOUND):
            assert (await http.get("/?tasks=2&sleep=0.3&exit=1")).status_code == 200
            status = await server.process.wait()  # no signal: the task stopped it
        report = await server.report()
        log = await trio.Path(server.log_path).read_text()

    assert status == 3, log
    assert (report["accepted"], report["completed"], report["failed"]) == (3, 2, 1)
    assert report["failure"] == "a background task raised SystemExit(0)"
    assert "raised SystemExit(0): shutting the background tasks down" in log


@pytest.mark.parametrize("phase", ["startup", "shutdown"])
async def test_an_app_whose_lifespan_fails_exits_3_and_says_so(tmp_path: Path, phase: str) -> None:
    """Before: a failed shutdown vanished (Hypercorn drops it), exit status 0."""
    port = free_port()
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "trio_bg", "serve", f"test_serve:failing_{phase}"]
    command += [f"--bind=127.0.0.1:{port}", f"--report-json={report_path}"]
    with trio.fail_after(BOUND):
        process = await trio.lowlevel.open_process(
            command, cwd=TESTS, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            assert process.stderr is not None
            log = b""
            while b"Running on" not in log and b"lifespan startup failed" not in log:
                log += await process.stderr.receive_some() or b"(ended)"
            if phase == "shutdown":
                process.send_signal(signal.SIGTERM)
            while chunk := await process.stderr.receive_some():
                log += chunk
            status = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    text = log.decode()
    assert status == 3, text
    assert f"the app's lifespan {phase} failed: the pool is broken" in text
    report = json.loads(report_path.read_text())
    assert report["failure"] == f"the app's lifespan {phase}: the pool is broken"
    assert report["accepted"] == 0


async def assert_the_nursery_cannot_start(
    tmp_path: Path, cause: str, *options: str, env: dict[str, str] | None = None
) -> None:
    """``serve`` with ``options`` exits 3, saying why in one line (no traceback), and
    writes the report with the ``failure``."""
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "trio_bg", "serve", "test_serve:app", "--bind=127.0.0.1:0"]
    command += [f"--report-json={report_path}", *options]
    with trio.fail_after(BOUND):
        result = await trio.run_process(
            command, cwd=TESTS, env=os.environ | (env or {}), capture_stderr=True, check=False
        )
    log = result.stderr.decode()
    assert result.returncode == 3, log
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if cause in line]
    assert line.startswith("trio_bg: the server failed: the background nursery could not start: ")
    report = json.loads(report_path.read_text())
    assert report["failure"].startswith("the background nursery could not start: ")
    assert cause in report["failure"]
    assert report["accepted"] == 0


@pytest.fixture
def redis_with_a_password(tmp_path: Path) -> Iterator[RedisServer]:
    yield from redis_server_or_skip(tmp_path, password="the right one")


async def test_a_nursery_that_cannot_reach_redis_exits_3_in_one_line(tmp_path: Path) -> None:
    """Before: a traceback ending in RuntimeError, exit status 1, no report."""
    nobody = f"redis://127.0.0.1:{free_port()}"
    await assert_the_nursery_cannot_start(
        tmp_path,
        "cannot reach Redis for streaq queue 'default': ConnectionError",
        "--streaq=streaq_app:tasks",
        env={"TRIO_BG_TEST_REDIS": nobody},
    )


async def test_a_nursery_refused_by_redis_exits_3_in_one_line(
    tmp_path: Path, redis_with_a_password: RedisServer
) -> None:
    wrong = redis_with_a_password.url.replace("redis://", "redis://:the-wrong-one@")
    await assert_the_nursery_cannot_start(
        tmp_path,
        "cannot reach Redis for streaq queue 'default': AuthenticationFailureError",
        "--streaq=streaq_app:tasks",
        env={"TRIO_BG_TEST_REDIS": wrong},
    )


async def test_a_nursery_whose_journal_stays_locked_exits_3_in_one_line(tmp_path: Path) -> None:
    """Takes the journal's busy timeout, 5 s."""
    path = tmp_path / "tasks.db"
    _journal_schema.connect(str(path)).close()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        await assert_the_nursery_cannot_start(
            tmp_path, "the database is locked by another process", f"--journal={path}"
        )
    finally:
        locker.close()


async def test_an_app_that_cannot_be_loaded_is_a_usage_error() -> None:
    with trio.fail_after(BOUND):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bg", "serve", "no_such_module:app"],
            cwd=TESTS,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert b"no module named 'no_such_module'" in result.stderr


async def test_a_server_that_cannot_bind_exits_3() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"
        with trio.fail_after(BOUND):
            result = await trio.run_process(
                [sys.executable, "-m", "trio_bg", "serve", "test_serve:app", f"--bind={bind}"],
                cwd=TESTS,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 3
    assert b"the server failed: [Errno" in result.stderr


# -- trio_bg.serve in-process ------------------------------------------------------------


def test_serve_is_exported() -> None:
    assert trio_bg.serve is trio_bg._web.serve.serve
    assert "serve" in trio_bg.__all__


async def test_an_app_already_wrapped_is_served_as_it_is() -> None:
    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=2.0)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.errorlog = None
    reports: list[trio_bg.ShutdownReport] = []

    async def run_serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        reports.append(await trio_bg.serve(middleware, config, task_status=task_status))

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(run_serve)
            async with client(binds[0]) as http:
                assert (await http.get("/?tasks=1&sleep=0.01")).status_code == 200
            os.kill(os.getpid(), signal.SIGINT)  # trio_bg.serve's signal receiver takes it

    # Wrapped twice, the outer middleware's (empty) report would come back instead.
    assert reports == [middleware.report]
    assert reports[0] is middleware.report
    assert (reports[0].accepted, reports[0].completed) == (1, 1)


async def test_an_app_already_wrapped_takes_no_options() -> None:
    middleware = trio_bg.BackgroundTaskMiddleware(app)
    with pytest.raises(TypeError, match=r"already a BackgroundTaskMiddleware.*grace_period"):
        await trio_bg.serve(middleware, grace_period=1.0)


async def test_a_shutdown_timeout_too_short_for_the_grace_period_is_refused() -> None:
    config = Config()
    config.shutdown_timeout = 10.0
    with pytest.raises(ValueError, match=r"shutdown_timeout \(10s\) is too short"):
        await trio_bg.serve(app, config, grace_period=8.0)
    # The grace period of an app already wrapped counts too.
    wrapped = trio_bg.BackgroundTaskMiddleware(app, grace_period=9.0)
    with pytest.raises(ValueError, match="grace_period of 9s"):
        await trio_bg.serve(wrapped, config)


def test_the_default_config_leaves_room_for_a_long_grace_period() -> None:
    config = default_config(grace_period=100.0)
    assert config.bind == ["127.0.0.1:8000"]
    assert config.shutdown_timeout == 100.0 + SHUTDOWN_MARGIN
    assert default_config(grace_period=1.0).shutdown_timeout == Config().shutdown_timeout
