"""Quart-Trio with trio_bg, end to end under a real ``hypercorn.trio.serve`` on loopback
and a real ``httpx.AsyncClient`` (plus one test through Quart-Trio's own test client).

Every wait is on a trio Event and bounded by ``trio.fail_after(BOUND)``; the only real
sleeps are the short task durations that the shutdown tests are about.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import httpx
import pytest
import trio
from conftest import Recorder, run_hypercorn, served

pytest.importorskip("quart_trio")

from quart import current_app, g, websocket
from quart_trio import QuartTrio

import trio_bg
import trio_bg.quart_trio
from trio_bg._web.middleware import ASGIApp, Receive, Scope, Send

BOUND = 10.0
"""Seconds any single wait may take before the test fails (generous: a noisy CI box)."""


def asgi(app: QuartTrio) -> ASGIApp:
    """``app`` as the ASGI callable it is (Quart types its messages more narrowly)."""
    return cast(ASGIApp, app)


@asynccontextmanager
async def served_quart(app: QuartTrio | ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with served(asgi(app) if isinstance(app, QuartTrio) else app) as client:
        yield client


def recording_returns(app: QuartTrio, returned: trio.Event) -> ASGIApp:
    """Serve ``app``; set ``returned`` once an HTTP request's ASGI call returned."""

    async def recorder(scope: Scope, receive: Receive, send: Send) -> None:
        await asgi(app)(scope, receive, send)
        if scope["type"] == "http":
            returned.set()

    return recorder


async def test_add_background_task_runs_after_the_response_in_an_app_context() -> None:
    app = QuartTrio(__name__)
    finished: dict[str, str | None] = {}
    slow_finished = trio.Event()

    def on_event(event: trio_bg.TaskEvent) -> None:
        if event.kind == "finished":
            finished[event.name] = event.outcome
            if event.name == "slow":
                slow_finished.set()

    middleware = trio_bg.quart_trio.init_app(app, grace_period=2.0, on_event=on_event)
    call_returned = trio.Event()
    recorder = Recorder()
    thread_of_sync_task: list[threading.Thread] = []

    @trio_bg.task(name="slow", timeout=0.05)
    async def too_slow() -> None:
        await trio.sleep_forever()

    async def async_job(name: str, fresh_app_context: bool = True) -> None:
        await call_returned.wait()  # started at once (as Quart-Trio does), or inline: never
        # A fresh app context, as in Quart-Trio: not the request's ``g``.
        assert current_app.name == app.name
        assert ("set_by_the_route" not in g) is fresh_app_context
        recorder.note(name)

    def sync_job(name: str) -> None:
        thread_of_sync_task.append(threading.current_thread())
        assert current_app.name == app.name
        trio.from_thread.run_sync(recorder.note, name)

    @app.route("/async")
    async def async_route() -> str:
        g.set_by_the_route = True
        app.add_background_task(async_job, "app method")  # replaced by init_app
        app.add_background_task(functools.partial(too_slow))
        with pytest.raises(TypeError, match="unexpected"):
            app.add_background_task(async_job, "x", unexpected=1)  # checked at once
        trio_bg.quart_trio.add_background_task(async_job, "module function")
        # The core API runs the task in a copy of the request's context, request's g included.
        trio_bg.current_tasks().add_task(async_job, "current_tasks", fresh_app_context=False)
        return "async"

    @app.route("/sync")
    def sync_route() -> str:  # Quart-Trio runs it in a worker thread
        app.add_background_task(sync_job, "from a sync route")
        return "sync"

    async with served_quart(recording_returns(app, call_returned)) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/async")).text == "async"
            await recorder.wait_for(3)
            assert (await client.get("/sync")).text == "sync"
            await recorder.wait_for(4)
            await slow_finished.wait()
    assert sorted(recorder.ran) == [
        "app method",
        "current_tasks",
        "from a sync route",
        "module function",
    ]
    assert thread_of_sync_task[0] is not threading.main_thread()
    assert middleware.report.completed == 4
    # Reported under the function's own name (and its @trio_bg.task options), not the
    # name of the wrapper that pushes the app context.
    assert finished == {
        async_job.__qualname__: "completed",
        sync_job.__qualname__: "completed",
        "slow": "timed_out",
    }
    assert app.extensions["trio_bg"] is middleware


async def test_errors_isolated_failed_requests_discard_and_overloaded_answers_503() -> None:
    app = QuartTrio(__name__)
    errors: list[str] = []
    recorder = Recorder()
    release, blocker_started = trio.Event(), trio.Event()
    middleware = trio_bg.quart_trio.init_app(
        app,
        grace_period=2.0,
        max_running=1,
        max_pending=1,
        retry_after=3,
        on_error=lambda name, error: errors.append(name),
    )

    async def fail() -> None:
        raise ValueError("boom")

    async def job(name: str) -> None:
        recorder.note(name)

    async def blocker() -> None:
        blocker_started.set()
        await release.wait()

    @app.route("/fail-then-ok")
    async def fail_then_ok() -> str:
        app.add_background_task(fail)
        app.add_background_task(job, "after the failure")
        return "ok"

    @app.route("/crash")
    async def crash() -> str:
        app.add_background_task(job, "after a crash")
        raise RuntimeError("unhandled")

    @app.route("/occupy")
    async def occupy() -> str:
        app.add_background_task(blocker)
        return "occupied"

    @app.route("/two")
    async def two() -> str:
        app.add_background_task(job, "first")  # the last free slot
        app.add_background_task(job, "second")  # Overloaded
        return "never"

    async with served_quart(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/fail-then-ok")).text == "ok"
            await recorder.wait_for(1)
            assert (await client.get("/crash")).status_code == 500
            assert (await client.get("/occupy")).text == "occupied"
            await blocker_started.wait()
            response = await client.get("/two")
            assert (response.status_code, response.headers["retry-after"]) == (503, "3")
            release.set()
    report = middleware.report
    assert errors == [fail.__qualname__]
    assert recorder.ran == ["after the failure"]
    assert (report.failed, report.completed, report.discarded) == (1, 2, 2)


async def run_one_task_then_shut_down(app: QuartTrio, add: str) -> list[str]:
    """Serve ``app``, have one request add a 0.5 s task, shut the server down as soon as
    the task started; return what happened to the task, and when."""
    events: list[str] = []
    task_started = trio.Event()
    shutdown_started = 0.0

    async def half_a_second() -> None:
        task_started.set()
        try:
            await trio.sleep(0.5)
        except trio.Cancelled:
            events.append(f"cancelled after {trio.current_time() - shutdown_started:.2f}s")
            raise
        events.append("completed")

    @app.route("/")
    async def index() -> str:
        if add == "quart-trio":
            QuartTrio.add_background_task(app, half_a_second)  # Quart-Trio's own
        else:
            app.add_background_task(half_a_second)  # trio_bg's, through init_app
        return "ok"

    @app.after_serving
    async def after_serving() -> None:
        events.append("after_serving")

    with trio.fail_after(BOUND):
        async with run_hypercorn(asgi(app)) as server:
            async with httpx.AsyncClient(base_url=server.url) as client:
                assert (await client.get("/")).text == "ok"
            await task_started.wait()
            shutdown_started = trio.current_time()
            server.shutdown.set()
            await server.stopped.wait()
    return events


async def test_quart_trio_cancels_its_tasks_at_once_trio_bg_waits_for_the_grace_period() -> None:
    plain = QuartTrio(__name__)
    assert plain.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] == 5  # it says 5 s...
    events = await run_one_task_then_shut_down(plain, add="quart-trio")
    assert events[0] == "after_serving"
    assert events[1].startswith("cancelled after ")  # ...the task dies at once
    assert float(events[1].split()[-1].rstrip("s")) < 0.5

    with_trio_bg = QuartTrio(__name__)
    middleware = trio_bg.quart_trio.init_app(with_trio_bg, grace_period=2.0)
    events = await run_one_task_then_shut_down(with_trio_bg, add="trio_bg")
    assert events == ["completed", "after_serving"]  # drained before Quart's shutdown
    assert (middleware.report.completed, middleware.report.unfinished) == (1, ())


async def test_a_task_past_the_grace_period_is_cancelled_and_reported() -> None:
    app = QuartTrio(__name__)
    middleware = trio_bg.quart_trio.init_app(app, grace_period=0.3)
    started = trio.Event()

    async def stuck() -> None:
        started.set()
        await trio.sleep_forever()

    @app.route("/")
    async def index() -> str:
        app.add_background_task(stuck)
        return "ok"

    with trio.fail_after(BOUND):
        async with served_quart(app) as client:
            assert (await client.get("/")).text == "ok"
            await started.wait()
    report = middleware.report
    assert (report.cancelled, report.unfinished) == (1, (stuck.__qualname__,))
    assert 0.3 <= report.duration < BOUND


async def test_websocket_and_startup_tasks_start_at_once_with_quarts_test_client() -> None:
    """Outside an HTTP request -- in a WebSocket session (which may last hours), or at
    startup -- ``add_background_task`` starts the task at once, as Quart-Trio does."""
    app = QuartTrio(__name__)
    middleware = trio_bg.quart_trio.init_app(app, grace_period=2.0)
    ran_during_session = trio.Event()
    ran_at_startup = trio.Event()

    async def set_event(event: trio.Event) -> None:
        event.set()

    @app.before_serving
    async def startup() -> None:
        app.add_background_task(set_event, ran_at_startup)

    @app.websocket("/ws")
    async def ws() -> None:
        app.add_background_task(set_event, ran_during_session)
        with trio.fail_after(BOUND):
            await ran_during_session.wait()  # not deferred to the end of the session
        await websocket.send("ran")

    with trio.fail_after(BOUND):
        async with app.test_app() as test_app:
            await ran_at_startup.wait()
            async with test_app.test_client().websocket("/ws") as ws_client:
                assert await ws_client.receive() == "ran"
    assert middleware.report.completed == 2


def test_init_app_checks_its_arguments() -> None:
    app = QuartTrio(__name__)
    with pytest.raises(ValueError, match="grace_period"):
        trio_bg.quart_trio.init_app(app, grace_period=-1)
    with pytest.raises(TypeError, match="QuartTrio"):
        trio_bg.quart_trio.init_app(object())  # type: ignore[arg-type]
    assert "trio_bg" not in app.extensions
    trio_bg.quart_trio.init_app(app)
    with pytest.raises(RuntimeError, match="already"):
        trio_bg.quart_trio.init_app(app)
    with pytest.raises(RuntimeError, match="init_app"):
        trio_bg.quart_trio.middleware_of(QuartTrio(__name__))


async def test_the_example(monkeypatch: pytest.MonkeyPatch) -> None:
    example = importlib.import_module("examples.quart_trio_app")
    sent: list[tuple[str, str]] = []
    sent_event = trio.Event()

    async def send_welcome_email(email: str) -> None:  # the example's, minus the wait
        sent.append((email, current_app.config["WELCOME_FROM"]))
        sent_event.set()

    monkeypatch.setattr(example, "send_welcome_email", send_welcome_email)
    async with served_quart(example.app) as client:
        with trio.fail_after(BOUND):
            response = await client.post("/signup", params={"email": "ada@example.com"})
            assert response.json() == {"status": "welcome", "email": "ada@example.com"}
            await sent_event.wait()
            assert (await client.get("/stats")).json() == {
                "running": 0,
                "pending": 0,
                "failed": 0,
            }
    assert sent == [("ada@example.com", "team@example.com")]
    assert example.middleware.report.completed == 1
