"""Shutdown through Hypercorn's ``shutdown_trigger``: drain within the grace period,
cancel at its end, abandon what ignores cancellation, report every task -- and only
then the wrapped app's own lifespan shutdown. Plus the lifespan edge cases, and the
grace period on trio's autojump clock.

Real grace periods are short (well under a second); every wait is bounded.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import asgi_client, run_hypercorn, run_lifespan
from hypercorn.utils import LifespanFailureError

import trio_bg
from trio_bg._web.middleware import ASGIApp, Message, Receive, Scope, Send

BOUND = 10.0
"""Seconds any single wait may take before the test fails."""


async def respond(send: Send, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def watch_lifespan_shutdown(app: ASGIApp, shutdown_received: trio.Event) -> ASGIApp:
    """Serve ``app``; set ``shutdown_received`` when the server sends lifespan.shutdown."""

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        async def watching_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                shutdown_received.set()
            return message

        await app(scope, watching_receive if scope["type"] == "lifespan" else receive, send)

    return watched


async def test_shutdown_drains_cancels_abandons_reports_then_shuts_the_app_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grace = 0.5
    events: list[str] = []  # what happened, in order
    shutdown_received = trio.Event()
    started = {name: trio.Event() for name in ("quick", "forever", "thread", "failing")}
    release_thread = threading.Event()
    thread_exited = threading.Event()
    thread_exited_at_app_shutdown: list[bool] = []

    async def finishes_within_grace() -> None:
        started["quick"].set()
        await shutdown_received.wait()
        await trio.sleep(grace / 5)  # a little work left when the shutdown begins
        events.append("quick task completed")

    async def sleeps_forever() -> None:
        started["forever"].set()
        try:
            await trio.sleep_forever()
        finally:
            events.append("forever task ended")

    def ignores_cancellation() -> None:
        try:
            trio.from_thread.run_sync(started["thread"].set)
            release_thread.wait(BOUND)  # deaf to trio's cancellation
        finally:
            thread_exited.set()

    async def fails() -> None:
        started["failing"].set()
        raise ValueError("failed before the shutdown")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            events.append("app shutdown")
            thread_exited_at_app_shutdown.append(thread_exited.is_set())
            await send({"type": "lifespan.shutdown.complete"})
            return
        tasks = trio_bg.current_tasks()
        tasks.add_task(finishes_within_grace)
        tasks.add_task(sleeps_forever)
        tasks.add_task(ignores_cancellation)
        tasks.add_task(fails)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=grace)
    served = watch_lifespan_shutdown(middleware, shutdown_received)
    try:
        async with run_hypercorn(served) as server:
            with trio.fail_after(BOUND):
                await _get(server.url)
                for event in started.values():
                    await event.wait()
                server.shutdown.set()
                await server.stopped.wait()
    finally:
        release_thread.set()  # let the abandoned thread end, whatever happened
    with trio.fail_after(BOUND):
        await trio.to_thread.run_sync(thread_exited.wait, BOUND)

    report = middleware.report
    assert (report.accepted, report.completed, report.failed) == (4, 1, 1)
    assert (report.cancelled, report.abandoned, report.discarded) == (1, 1, 0)
    assert report.accepted == (
        report.completed + report.failed + report.timed_out + report.cancelled + report.abandoned
    )
    assert sorted(name.rsplit(".", 1)[-1] for name in report.unfinished) == [
        "ignores_cancellation",
        "sleeps_forever",
    ]
    # The grace period was waited out in full (the forever task kept it busy), no more.
    assert grace <= report.duration < grace + BOUND / 2
    # Drained, then cancelled, then (and only then) the app's own shutdown -- which
    # did not wait for the abandoned thread.
    assert events == ["quick task completed", "forever task ended", "app shutdown"]
    assert thread_exited_at_app_shutdown == [False]

    summaries = [
        record
        for record in caplog.records
        if record.name == "trio_bg" and "background tasks shut down" in record.getMessage()
    ]
    assert len(summaries) == 1
    assert summaries[0].levelno == logging.WARNING  # not everything completed
    assert summaries[0].getMessage().startswith("background tasks shut down: 4 accepted")


async def test_a_task_within_the_grace_period_completes_and_the_report_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_bg")
    shutdown_received = trio.Event()
    task_started = trio.Event()
    task_completed_at_app_shutdown: list[bool] = []
    completed = False

    async def task() -> None:
        nonlocal completed
        task_started.set()
        await shutdown_received.wait()
        await trio.sleep(0.05)  # still busy when the shutdown begins
        completed = True

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            task_completed_at_app_shutdown.append(completed)
            await send({"type": "lifespan.shutdown.complete"})
            return
        trio_bg.current_tasks().add_task(task)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=2.0)
    async with run_hypercorn(watch_lifespan_shutdown(middleware, shutdown_received)) as server:
        with trio.fail_after(BOUND):
            await _get(server.url)
            await task_started.wait()
            server.shutdown.set()
            await server.stopped.wait()

    report = middleware.report
    assert (report.accepted, report.completed, report.unfinished) == (1, 1, ())
    assert report.all_completed
    assert 0.05 <= report.duration < 2.0  # waited for the task, not for the grace period
    assert task_completed_at_app_shutdown == [True]
    assert any(
        r.levelno == logging.INFO and r.getMessage().startswith("background tasks shut down")
        for r in caplog.records
        if r.name == "trio_bg"
    )


async def test_a_request_in_flight_at_shutdown_still_gets_its_tasks_drained() -> None:
    handler_waiting, release_response = trio.Event(), trio.Event()
    task_ran = False

    async def task() -> None:
        nonlocal task_ran
        task_ran = True

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise NotImplementedError  # no lifespan of its own
        trio_bg.current_tasks().add_task(task)
        handler_waiting.set()
        await release_response.wait()
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=1.0)
    replies: list[str] = []
    async with run_hypercorn(middleware) as server, trio.open_nursery() as nursery:
        with trio.fail_after(BOUND):
            nursery.start_soon(_append_reply, server.url, replies)
            await handler_waiting.wait()
            server.shutdown.set()
            # Hypercorn has stopped listening and now gives the request its
            # graceful_timeout (3 s); the lifespan shutdown waits for it.
            await trio.testing.wait_all_tasks_blocked()
            assert not server.stopped.is_set()
            release_response.set()
            await server.stopped.wait()

    assert replies == ["ok"]
    assert task_ran
    report = middleware.report
    assert (report.accepted, report.completed, report.discarded) == (1, 1, 0)


async def test_a_request_cut_off_by_hypercorns_graceful_timeout_has_its_tasks_discarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler_waiting = trio.Event()
    task_ran = False

    async def never_runs() -> None:
        nonlocal task_ran
        task_ran = True

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise NotImplementedError  # no lifespan of its own
        trio_bg.current_tasks().add_task(never_runs)
        handler_waiting.set()
        await trio.sleep_forever()  # Hypercorn cancels it once graceful_timeout is up

    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=1.0)
    async with (
        run_hypercorn(middleware, graceful_timeout=0.2) as server,
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(BOUND):
            nursery.start_soon(_expect_no_reply, server.url)
            await handler_waiting.wait()
            server.shutdown.set()
            await server.stopped.wait()

    assert not task_ran
    report = middleware.report
    assert (report.accepted, report.discarded) == (0, 1)
    assert any(
        r.name == "trio_bg" and "cancelled" in r.getMessage() and "never_runs" in r.getMessage()
        for r in caplog.records
    )


async def test_startup_failure_of_the_wrapped_app_stops_the_server_starting() -> None:
    requests_served = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal requests_served
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.failed", "message": "no database"})
            return
        requests_served += 1
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    with (
        pytest.RaisesGroup(
            pytest.RaisesExc(LifespanFailureError, match="no database"), flatten_subgroups=True
        ),
        trio.fail_after(BOUND),
    ):
        async with run_hypercorn(middleware):
            # Hypercorn 0.18 reports itself started (task_status.started, "Running on")
            # even after a failed startup, and raises at its next checkpoint: this
            # block is entered, and cancelled by the failure. A server that kept
            # running would end in TooSlowError here instead.
            await trio.sleep_forever()
    assert requests_served == 0
    assert middleware.nursery.closed  # opened for the startup, closed again at once


async def test_an_app_that_raises_on_lifespan_is_served_and_its_tasks_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    task_ran = trio.Event()

    async def task() -> None:
        task_ran.set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise NotImplementedError(f"no {scope['type']} here")
        trio_bg.current_tasks().add_task(task)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=1.0)
    async with run_hypercorn(middleware) as server:
        with trio.fail_after(BOUND):
            assert await _get(server.url) == "ok"
            await task_ran.wait()

    # The middleware spoke the lifespan itself (it has a report: its nursery was
    # opened at startup and drained at shutdown) and served the app without one.
    assert (middleware.report.accepted, middleware.report.completed) == (1, 1)
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert any(
        name == "trio_bg" and "does not handle lifespan" in message for name, message in messages
    ), messages
    # Hypercorn never saw a lifespan error: it would have served without lifespan,
    # and the middleware would have had no nursery for the request.
    assert not any(
        name.startswith("hypercorn") and "Lifespan" in message for name, message in messages
    ), messages


@pytest.mark.parametrize(
    ("work", "outcome", "duration"),
    [(5.0, "completed", 5.0), (60.0, "cancelled", 10.0)],
)
async def test_grace_period_on_the_autojump_clock(
    autojump_clock: trio.testing.MockClock, work: float, outcome: str, duration: float
) -> None:
    finished: list[bool] = []

    async def task(seconds: float) -> None:
        await trio.sleep(seconds)
        finished.append(True)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise NotImplementedError  # no lifespan of its own
        trio_bg.current_tasks().add_task(task, work)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=10.0)
    async with run_lifespan(middleware) as lifespan, asgi_client(middleware) as client:
        assert (await client.get("/")).status_code == 200
        started_at = trio.current_time()
    assert lifespan.sent[-1]["type"] == "lifespan.shutdown.complete"

    report = middleware.report
    counts: dict[str, Any] = {"completed": report.completed, "cancelled": report.cancelled}
    assert report.accepted == 1 and counts[outcome] == 1
    assert finished == ([True] if outcome == "completed" else [])
    assert report.duration == pytest.approx(duration, abs=0.01)
    assert trio.current_time() - started_at == pytest.approx(duration, abs=0.01)


async def _get(url: str) -> str:
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
        response.raise_for_status()
        return response.text


async def _append_reply(url: str, replies: list[str]) -> None:
    replies.append(await _get(url))


async def _expect_no_reply(url: str) -> None:
    with pytest.raises(httpx.HTTPError):
        await _get(url)
