"""trio_bg.metrics.app under ``python -m trio_bg serve --workers 2``: whichever worker a
scrape reaches, it answers for both, each sample labelled with its ``worker``.

Real processes: this module is also the app they serve (``test_metrics_workers:app``),
whose answers say which worker gave them. Every wait is bounded; the server runs in a
session of its own, and its process group is killed in a ``finally``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from contextlib import suppress
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

import trio_bg
import trio_bg.metrics
from trio_bg._web.asgi import Message, Receive, Scope, Send

BOUND = 20.0
"""Seconds the whole test may take (generous: a noisy machine)."""

TESTS = Path(__file__).parent
REQUESTS = 120
"""The load: requests, each on a new connection, so that both workers take some."""


async def job() -> None:
    await trio.lowlevel.checkpoint()


METRICS = trio_bg.metrics.app()


async def routes(scope: Scope, receive: Receive, send: Send) -> None:
    """``/metrics``: the metrics; anything else adds a `job`. Every answer names the
    worker that gave it (``x-worker``)."""
    if scope["type"] != "http":
        return
    worker = os.environ.get("TRIO_BG_WORKER", "").encode()

    async def send_naming_the_worker(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], (b"x-worker", worker)]
        await send(message)

    if scope["path"] == "/metrics":
        await METRICS(scope, receive, send_naming_the_worker)
        return
    trio_bg.current_tasks().add_task(job)
    await send_naming_the_worker({"type": "http.response.start", "status": 200, "headers": []})
    await send_naming_the_worker({"type": "http.response.body", "body": b"ok"})


app = trio_bg.BackgroundTaskMiddleware(routes, grace_period=5)


def completed_by_worker(text: str) -> dict[str, float]:
    """``trio_bg_tasks_total{name="job", outcome="completed"}`` of a scrape, by worker;
    every sample of every trio_bg family must have a worker label."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("trio_bg_"):
                continue
            assert "worker" in sample.labels, sample
            if sample.name == "trio_bg_tasks_total" and sample.labels["name"] == "job":
                assert sample.labels["outcome"] == "completed", sample
                found[sample.labels["worker"]] = sample.value
    return found


def workers_in(text: str) -> set[str]:
    return {
        sample.labels["worker"]
        for family in text_string_to_metric_families(text)
        if family.name == "trio_bg_tasks_running"
        for sample in family.samples
    }


async def test_a_scrape_of_either_worker_counts_the_tasks_of_both(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "trio_bg", "serve", "test_metrics_workers:app"]
    command += ["--workers=2", "--bind=127.0.0.1:0"]
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            command,
            cwd=TESTS,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: killpg reaches every worker
        )
    new_connections = httpx.Limits(max_keepalive_connections=0)
    try:
        with trio.fail_after(BOUND):
            while not (
                served := re.search(r"serving \S+ on (\S+) with 2 workers", log_path.read_text())
            ):
                assert process.poll() is None, log_path.read_text()
                await trio.sleep(0.02)
            async with httpx.AsyncClient(
                base_url=served[1], limits=new_connections, trust_env=False
            ) as client:
                # The first scrape asks both workers to record: wait until one shows both
                # (other processes: nothing to wait on but their answers).
                while workers_in((await client.get("/metrics")).text) != {"1", "2"}:  # noqa: ASYNC110
                    await trio.sleep(0.05)

                answered: Counter[str] = Counter()

                async def load(count: int) -> None:
                    for _ in range(count):
                        response = await client.get("/")
                        answered[response.headers["x-worker"]] += 1

                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(load, REQUESTS // 4)
                assert sum(answered.values()) == REQUESTS
                assert set(answered) == {"1", "2"}, answered  # both took some

                # Each worker shares its numbers every second: until then a scrape of
                # one may show the other's older count, never a count that is not so.
                exact_from: set[str] = set()
                while exact_from != {"1", "2"}:
                    response = await client.get("/metrics")
                    counts = completed_by_worker(response.text)
                    for worker, count in counts.items():
                        assert count <= answered[worker], (counts, answered)
                    if counts == answered:
                        exact_from.add(response.headers["x-worker"])
                    else:
                        await trio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0, log_path.read_text()
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a no-op unless the test failed
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await process.wait()
