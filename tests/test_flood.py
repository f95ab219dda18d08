"""A request flood against small limits: bounded, refused with 503s, nothing lost."""

from __future__ import annotations

from collections import Counter

import trio

import trio_bg
from trio_bg._web.middleware import Receive, Scope, Send
from trio_bg.testing import open_test_client

MAX_RUNNING, MAX_PENDING = 4, 16
REQUESTS, CONCURRENCY = 400, 50


async def test_a_flood_is_bounded_refused_with_503s_and_nothing_admitted_is_lost() -> None:
    release = trio.Event()
    completions = 0
    high_water = {"running": 0, "pending": 0}

    async def job() -> None:
        nonlocal completions
        await release.wait()
        completions += 1

    middleware: trio_bg.BackgroundTaskMiddleware

    def watch(event: trio_bg.TaskEvent) -> None:
        stats = middleware.nursery.stats
        high_water["running"] = max(high_water["running"], stats.running)
        high_water["pending"] = max(high_water["pending"], stats.pending)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(job)  # Overloaded escapes: the middleware says 503
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = trio_bg.BackgroundTaskMiddleware(
        app, max_running=MAX_RUNNING, max_pending=MAX_PENDING, on_event=watch, grace_period=5
    )
    statuses: Counter[int] = Counter()
    async with open_test_client(middleware) as client:
        requests = iter(range(REQUESTS))

        async def worker() -> None:
            for _ in requests:
                statuses[(await client.get("/")).status_code] += 1

        with trio.fail_after(30):
            async with trio.open_nursery() as load:
                for _ in range(CONCURRENCY):
                    load.start_soon(worker)
        stats = client.stats
        assert (stats.running, stats.pending) == (MAX_RUNNING, MAX_PENDING)
        release.set()
        await client.drain()

    assert statuses == {202: MAX_RUNNING + MAX_PENDING, 503: REQUESTS - MAX_RUNNING - MAX_PENDING}
    assert high_water == {"running": MAX_RUNNING, "pending": MAX_PENDING}
    report = client.report
    assert report.accepted == statuses[202] == completions == report.completed
    assert client.stats.rejected == statuses[503]
    assert report.discarded == 0 and report.unfinished == ()
