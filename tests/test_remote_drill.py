"""``python -m trio_bg drill APP --redis``: the distributed drill, for real (a Redis of its
own, ``python -m trio_bg worker`` processes, the web server, SIGKILLs), and the
``serve --streaq`` and ``worker APP`` it builds on.

Each drill runs the real command with a small load, short grace periods and a streaq
idle timeout of 1 s, under ``trio.fail_after``: on a timeout ``trio.run_process``
sends the drill SIGTERM, on which it stops every process it started.

With ``$TRIO_BG_DRILL_REDIS`` set (by the drill), this module is also a lossy app: its
answers name two remote tasks, and it hands off one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_bg
from trio_bg._cli.main import main
from trio_bg._web.middleware import Receive, Scope, Send

BOUND = 40.0
"""Seconds one drill may take before the test fails (a noisy machine; typically ~5 s)."""

ROOT = Path(__file__).parent.parent
TESTS = Path(__file__).parent

LOAD = (
    "--requests=40",
    "--concurrency=4",
    "--rate=40",
    "--signal-after=5",  # all 40 are sent within 1 s: SIGTERM follows the last answer
    "--graceful-timeout=1",
    "--idle-timeout=1",  # a killed worker's tasks go to the other within a second or two
)

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.environ.get("TRIO_BG_TESTS_NEED_REDIS"),
    reason="redis-server is not installed (Debian: apt-get install redis-server)",
)


async def run(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``python -m trio_bg ARGS``; return its status, stdout, stderr."""
    with trio.fail_after(BOUND):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bg", *args],
            cwd=cwd,
            env=os.environ | (env or {}),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@needs_redis
async def test_the_example_loses_nothing_when_a_worker_is_killed() -> None:
    status, out, err = await run(
        "drill", "examples.drill_app:app", "--redis", "--workers=2", "--kill-worker",
        *LOAD, "--grace-period=0.5", "--json",
    )  # fmt: skip
    assert status == 0, out + err
    result: dict[str, Any] = json.loads(out)
    assert result["verdict"] == "pass", result
    server, remote = result["web_server"], result["remote_tasks"]
    assert server["answered"] == server["sent"] == 40
    assert remote["claimed"] == remote["completed"] == 2 * server["answered"]
    assert remote["lost"] == []
    assert server["report"]["handed_off"] >= remote["claimed"]
    killed, survivor = sorted(result["workers"], key=lambda worker: worker["killed_after"] is None)
    assert killed["exit_status"] == -9
    assert survivor["exit_status"] == 0
    # The kill cut tasks short: they ran on the survivor once their idle timeout passed.
    assert killed["cut_short"] > 0
    assert remote["drained_after"] is not None
    assert "drill: SIGKILL sent to worker" in err


@needs_redis
async def test_with_a_journal_a_redis_restart_loses_nothing(tmp_path: Path) -> None:
    # A grace period long enough for the journal's backlog to reach Redis again.
    status, out, err = await run(
        "drill", "examples.drill_app:app", "--redis", "--kill-redis",
        f"--journal={tmp_path / 'tasks.db'}", *LOAD, "--grace-period=2", "--json",
    )  # fmt: skip
    assert status == 0, out + err
    result: dict[str, Any] = json.loads(out)
    assert result["verdict"] == "pass", result
    server, remote, redis = result["web_server"], result["remote_tasks"], result["redis"]
    assert server["answered"] == server["sent"] == 40  # no 503: the journal kept the tasks
    assert server["report"]["deferred"] == 0
    assert remote["claimed"] == remote["completed"] == 80
    assert remote["lost"] == []
    assert redis["own"]
    assert 0 < redis["killed_after"] < server["signal_after"]
    assert redis["down_for"] > 0
    assert "drill: Redis killed (SIGKILL) after" in err
    assert "drill: Redis started again" in err


@needs_redis
async def test_with_a_journal_a_redis_restart_without_its_data_loses_nothing(
    tmp_path: Path,
) -> None:
    status, out, err = await run(
        "drill", "examples.drill_app:app", "--redis", "--kill-redis",
        "--redis-without-persistence", f"--journal={tmp_path / 'tasks.db'}", *LOAD,
        "--grace-period=3", "--json",
    )  # fmt: skip
    assert status == 0, out + err
    result: dict[str, Any] = json.loads(out)
    assert result["verdict"] == "pass", result
    server, remote = result["web_server"], result["remote_tasks"]
    assert server["answered"] == server["sent"] == 40
    assert remote["claimed"] == remote["completed"] == 80
    assert remote["lost"] == []
    assert server["report"]["maybe_lost"] == 0


@needs_redis
async def test_an_app_that_loses_remote_tasks_fails() -> None:
    # The middleware's own worker: serve gets no --streaq, the workers run the app's spec.
    app = "test_remote_drill:wrapped_lossy_app"
    status, out, err = await run(
        "drill", app, "--redis", f"--streaq={app}", "--requests=40", "--rate=0", cwd=TESTS
    )
    assert status == 1, out + err
    for row, value in (("claimed by answers", 80), ("completed at least once", 40), ("lost", 40)):
        assert f"    {row:<26}{value:>8}" in out
    problems = [line for line in out.splitlines() if "PROBLEM" in line]
    assert len(problems) == 1
    assert problems[0].startswith(
        "  PROBLEM: 40 remote task(s) named by answered requests never ran to the end: "
    )
    assert problems[0].count("-dropped") == 10
    assert "verdict: FAIL" in out
    assert "drill: the queue is empty" in err  # it did not wait for the deadline


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--redis=redis://127.0.0.1:1", "--kill-redis"],
            "--kill-redis needs the drill's own Redis",
        ),
        (["--kill-worker"], "--kill-worker needs --redis, the distributed drill"),
        (["--workers=3"], "--workers needs --redis, the distributed drill"),
        (["--redis", "--kill-worker", "--workers=1"], "--kill-worker needs --workers 2 or more"),
        (["--redis=localhost"], "--redis: expected a URL (redis://HOST:PORT), not 'localhost'"),
    ],
)
def test_usage_errors_exit_2(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["drill", "examples.drill_app:app", *options])
    assert exit.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


async def test_a_streaq_worker_that_cannot_run_is_refused_before_anything_starts() -> None:
    never_used = {"TRIO_BG_TEST_REDIS": "redis://127.0.0.1:1"}
    refused = {
        ("drill", "test_serve:app", "--redis", "--streaq=test_serve:nobody"): (
            "--streaq: cannot load 'test_serve:nobody': test_serve has no 'nobody'"
        ),
        ("serve", "test_serve:app", "--streaq=no_such_module:worker"): (
            "--streaq: cannot load 'no_such_module:worker': no module named 'no_such_module'"
        ),
        ("serve", "test_serve:app", "--streaq=streaq_app:pickling_tasks"): (
            "--streaq: streaq worker 'default' unpickles what it reads"
        ),
        ("serve", "test_serve:app", "--streaq=test_serve:app"): (
            "--streaq: expected a streaq Worker"
        ),
        ("worker", "test_remote_drill:wrapped_app"): (
            "cannot run 'test_remote_drill:wrapped_app': it is a BackgroundTaskMiddleware with "
            "no streaq worker (streaq=)"
        ),
    }
    results: dict[tuple[str, ...], tuple[int, str, str]] = {}

    async def refuse(command: tuple[str, ...]) -> None:
        results[command] = await run(*command, cwd=TESTS, env=never_used)

    async with trio.open_nursery() as nursery:
        for command in refused:
            nursery.start_soon(refuse, command)
    for command, message in refused.items():
        status, _, err = results[command]
        assert status == 2, err
        assert f"error: {message}" in err


# -- the apps the subprocesses serve ---------------------------------------------------


async def _lifespan_only(scope: Scope, receive: Receive, send: Send) -> None:
    while True:
        kind = (await receive())["type"].removeprefix("lifespan.")
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


wrapped_app = trio_bg.BackgroundTaskMiddleware(_lifespan_only)
"""A middleware without a streaq worker: ``python -m trio_bg worker`` refuses it."""

if REDIS := os.environ.get("TRIO_BG_DRILL_REDIS"):
    import uuid

    import trio_bg.streaq

    worker = trio_bg.streaq.worker(REDIS, idle_timeout=1)

    @worker.task(name="tests.lossy.render")
    async def render(key: str) -> None:
        line = f"{key} ran {os.getpid()}\n".encode()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        descriptor = os.open(os.environ["TRIO_BG_DRILL_LEDGER"], flags, 0o600)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)

    async def lossy_app(scope: Scope, receive: Receive, send: Send) -> None:
        """Names two remote tasks in its answer, and hands off the first only."""
        if scope["type"] == "lifespan":
            await _lifespan_only(scope, receive, send)
            return
        key = uuid.uuid4().hex[:12]
        trio_bg.current_tasks().add_task(render, f"{key}-kept")
        header = f"{key}-kept {key}-dropped".encode()
        headers = [(b"x-trio-bg-remote", header)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped_lossy_app = trio_bg.BackgroundTaskMiddleware(lossy_app, streaq=worker, grace_period=0.5)
