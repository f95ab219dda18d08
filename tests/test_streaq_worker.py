"""``python -m trio_bg worker``: real worker processes (``streaq_app:tasks``), a real
Redis, real SIGTERMs and SIGKILLs; the tasks are enqueued from this process with the
same module's worker.

Every wait is bounded; every child process is killed on the way out.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import trio
from processes import BOUND, TESTS, Child, trio_bg_process
from redis_server import RedisServer, free_port

LOST_REDIS = r"ERROR trio_bg: streaq worker \w+ cannot use Redis"


def worker_process(
    tmp_path: Path, redis_url: str, **env: str
) -> AbstractAsyncContextManager[Child]:
    """``python -m trio_bg worker streaq_app:tasks``; yielded once it has started (it
    may not have connected to Redis yet)."""
    return trio_bg_process(
        "worker",
        "streaq_app:tasks",
        ready="starting worker",
        env={"TRIO_BG_TEST_REDIS": redis_url, "TRIO_BG_TEST_LEDGER": str(tmp_path / "ledger")}
        | env,
    )


def streaq_app(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> ModuleType:
    """The test app's module, imported afresh: its worker uses the Redis at ``redis_url``."""
    monkeypatch.setenv("TRIO_BG_TEST_REDIS", redis_url)
    sys.modules.pop("streaq_app", None)
    return importlib.import_module("streaq_app")


def ledger(tmp_path: Path) -> list[str]:
    path = tmp_path / "ledger"
    return path.read_text().splitlines() if path.exists() else []


async def wait_for_ledger(tmp_path: Path, line: str) -> None:
    """Return once a line of the ledger starts with ``line`` (the caller bounds it)."""
    # The ledger is a file that other processes append to: there is no event to wait on.
    while not any(entry.startswith(line) for entry in ledger(tmp_path)):  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_a_task_is_stored_as_json_and_runs_on_a_worker(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = streaq_app(monkeypatch, redis_server.url)
    async with app.tasks:
        task = await app.record.enqueue("first")
        raw = await app.tasks.redis.get(f"streaq:default:task:data:{task.id}")
    assert json.loads(raw)["f"] == "tests.streaq_app.record"
    assert json.loads(raw)["a"] == ["first"]

    async with worker_process(tmp_path, redis_server.url) as worker:
        with trio.fail_after(BOUND):
            await worker.output.wait_for(rf"task tests\.streaq_app\.record ■ {task.id}")
        assert await worker.stop() == 0
    assert ledger(tmp_path) == [f"first {worker.process.pid}"]


async def test_sigterm_lets_the_running_task_finish(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = streaq_app(monkeypatch, redis_server.url)
    async with app.tasks:
        await app.slow.enqueue("slow", 2.0)

    async with worker_process(tmp_path, redis_server.url) as worker:
        with trio.fail_after(BOUND):
            await wait_for_ledger(tmp_path, "slow started")
        assert await worker.stop() == 0
    pid = worker.process.pid
    assert ledger(tmp_path) == [f"slow started {pid}", f"slow done {pid}"]
    assert "waiting up to 10s for tasks to finish" in worker.output.text


async def test_a_killed_workers_task_runs_on_another(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = streaq_app(monkeypatch, redis_server.url)
    async with app.tasks:
        await app.slow.enqueue("killed", 0.1)

    idle = {"TRIO_BG_TEST_IDLE_TIMEOUT": "1"}
    async with worker_process(tmp_path, redis_server.url, TRIO_BG_TEST_HOLD="1", **idle) as first:
        with trio.fail_after(BOUND):
            await wait_for_ledger(tmp_path, "killed started")
            first.process.kill()
            assert await first.process.wait() == -signal.SIGKILL
    async with worker_process(tmp_path, redis_server.url, **idle) as second:
        with trio.fail_after(BOUND):
            await wait_for_ledger(tmp_path, "killed done")
        assert await second.stop() == 0
    assert ledger(tmp_path) == [
        f"killed started {first.process.pid}",
        f"killed started {second.process.pid}",
        f"killed done {second.process.pid}",
    ]


async def test_a_task_the_worker_does_not_know_waits_for_one_that_does(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = streaq_app(monkeypatch, redis_server.url)
    async with app.tasks:
        await app.tasks.enqueue_unsafe("tests.streaq_app.added_later", "later")

    idle = {"TRIO_BG_TEST_IDLE_TIMEOUT": "1"}
    async with worker_process(tmp_path, redis_server.url, **idle) as older:
        with trio.fail_after(BOUND):
            await older.output.wait_for(
                r"ERROR trio_bg: streaq worker \w+ does not know task "
                r"tests\.streaq_app\.added_later"
            )
        assert await older.stop() == 0
    assert ledger(tmp_path) == []
    async with worker_process(tmp_path, redis_server.url, TRIO_BG_TEST_NEWER="1", **idle) as newer:
        with trio.fail_after(BOUND):
            await wait_for_ledger(tmp_path, "later")
        assert await newer.stop() == 0
    assert ledger(tmp_path) == [f"later {newer.process.pid}"]


async def test_what_is_not_a_json_worker_is_refused() -> None:
    refused = {
        "streaq_app:pickling_tasks": "cannot run 'streaq_app:pickling_tasks': streaq worker "
        "'default' unpickles what it reads",
        "streaq_app:record": "cannot run 'streaq_app:record': expected a streaq Worker",
        "streaq_app": "cannot load 'streaq_app': give the worker as module:attribute",
        "streaq_app:nobody": "cannot load 'streaq_app:nobody': streaq_app has no 'nobody'",
        "no_such_app:tasks": "cannot load 'no_such_app:tasks': no module named 'no_such_app'",
    }
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(spec: str) -> None:
        results[spec] = await trio.run_process(
            [sys.executable, "-m", "trio_bg", "worker", spec],
            cwd=TESTS,
            env=os.environ | {"TRIO_BG_TEST_REDIS": "redis://127.0.0.1:1"},  # never used
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            for spec in refused:
                nursery.start_soon(run, spec)
    for spec, message in refused.items():
        stderr = results[spec].stderr.decode()
        assert results[spec].returncode == 2, stderr
        assert f"python -m trio_bg worker: error: {message}" in stderr


async def test_the_worker_outlives_a_redis_restart(
    tmp_path: Path, durable_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = durable_redis_server
    app = streaq_app(monkeypatch, redis.url)
    async with worker_process(tmp_path, redis.url) as worker:
        with trio.fail_after(BOUND):
            async with app.tasks:
                await app.record.enqueue("before")
            await wait_for_ledger(tmp_path, "before")

            await trio.to_thread.run_sync(redis.stop)
            await worker.output.wait_for(LOST_REDIS)
            await trio.to_thread.run_sync(redis.start)
            async with app.tasks:
                await app.record.enqueue("after")
            await wait_for_ledger(tmp_path, "after")

            # Lost again: a SIGTERM while it waits for Redis stops it.
            await trio.to_thread.run_sync(redis.stop)
            await worker.output.wait_for(
                LOST_REDIS, len(re.findall(LOST_REDIS, worker.output.text)) + 1
            )
        assert await worker.stop() == 0
    assert "INFO trio_bg: received SIGTERM: the worker stops" in worker.output.text
    pid = worker.process.pid
    assert ledger(tmp_path) == [f"before {pid}", f"after {pid}"]


async def test_the_worker_serves_the_metrics_of_the_tasks_it_runs(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    app = streaq_app(monkeypatch, redis_server.url)
    async with app.tasks:
        for key in ("a", "b", "c"):
            await app.record.enqueue(key)
        await app.slow.enqueue("held", 60.0)  # running while scraped
        await app.too_slow.enqueue("late")
    port = free_port()
    async with trio_bg_process(
        "worker",
        "streaq_app:tasks",
        f"--metrics=127.0.0.1:{port}",
        ready=f"Running on http://127.0.0.1:{port}",
        env={
            "TRIO_BG_TEST_REDIS": redis_server.url,
            "TRIO_BG_TEST_LEDGER": str(tmp_path / "ledger"),
        },
    ):
        with trio.fail_after(BOUND):
            for key in ("a ", "b ", "c ", "held started"):
                await wait_for_ledger(tmp_path, key)
            async with httpx.AsyncClient() as http:
                while True:  # (until the task that times out has: 200 ms after its start)
                    scraped = await http.get(f"http://127.0.0.1:{port}/metrics")
                    assert scraped.status_code == 200, scraped.text
                    samples = {
                        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                        for family in text_string_to_metric_families(scraped.text)
                        for sample in family.samples
                    }
                    if any(
                        name == "trio_bg_tasks_total" and "too_slow" in str(labels)
                        for name, labels in samples
                    ):
                        break
                    await trio.sleep(0.05)
    too_slow = (("name", "tests.streaq_app.too_slow"), ("outcome", "timed_out"))
    assert samples["trio_bg_tasks_total", too_slow] == 1
    record = (("name", "tests.streaq_app.record"),)
    assert samples["trio_bg_tasks_total", (*record, ("outcome", "completed"))] == 3
    assert samples["trio_bg_task_duration_seconds_count", record] == 3
    assert samples["trio_bg_task_wait_seconds_count", record] == 3
    assert samples["trio_bg_task_wait_seconds_count", (("name", "tests.streaq_app.slow"),)] == 1
    assert samples["trio_bg_tasks_running", ()] == 1
    assert not any(name == "trio_bg_tasks_pending" for name, _ in samples)  # a nursery's only
