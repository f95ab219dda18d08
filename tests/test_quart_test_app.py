"""Quart's own test tooling, ``app.test_app()``, for an app with trio_bg.quart_trio:
its shutdown waits out the grace period, ``drain()`` waits for the tasks, and a failing
task fails the test. Virtual time (``autojump_clock``) wherever the grace period or a
timeout is waited for.
"""

from __future__ import annotations

import importlib

import pytest
import trio
import trio.testing
from quart import websocket
from quart.testing.app import LifespanError
from quart_trio import QuartTrio
from quart_trio.testing import TrioTestApp

import trio_bg
import trio_bg.quart_trio
from trio_bg.quart_trio import TestApp
from trio_bg.testing import TaskFailures


def shop(**options: object) -> tuple[QuartTrio, list[str]]:
    """A Quart-Trio app whose ``/<seconds>`` adds a task of that many seconds, and
    ``/fail`` one that fails; and the list of what completed."""
    app = QuartTrio(__name__)
    trio_bg.quart_trio.init_app(app, **options)  # type: ignore[arg-type]
    done: list[str] = []

    async def deliver(seconds: int) -> None:
        await trio.sleep(seconds)
        done.append(f"{seconds}s")

    async def explode() -> None:
        raise LookupError("no such order")

    @app.route("/<int:seconds>")
    async def slow(seconds: int) -> str:
        app.add_background_task(deliver, seconds)
        return "ok"

    @app.route("/fail")
    async def fail() -> str:
        app.add_background_task(explode)
        return "ok"

    return app, done


async def test_a_task_longer_than_quarts_6s_completes_within_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Quart-Trio's test app gives the shutdown 6 s; trio_bg's default grace period is
    10 s. Its own ``TrioTestApp`` would fail here with TooSlowError, then a
    TrioInternalError; after init_app, ``app.test_app()`` waits for the 7 s task."""
    app, done = shop()  # the default grace period
    async with app.test_app() as test_app:
        assert isinstance(test_app, TestApp)
        assert test_app.shutdown_timeout == 6 + trio_bg.DEFAULT_GRACE_PERIOD
        assert (await test_app.test_client().get("/7")).status_code == 200
        shutdown_started = trio.current_time()
    assert done == ["7s"]
    assert trio.current_time() - shutdown_started == pytest.approx(7)
    assert trio_bg.quart_trio.middleware_of(app).report.all_completed


async def test_a_task_past_the_grace_period_is_cancelled_and_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app, done = shop(grace_period=30)
    async with app.test_app() as test_app:
        await test_app.test_client().get("/3600")
    assert done == []
    assert (test_app.report.cancelled, test_app.report.duration) == (1, pytest.approx(30))


async def test_drain_waits_and_raises_what_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app, done = shop()
    async with app.test_app() as test_app:
        client = test_app.test_client()
        await client.get("/2")
        await client.get("/fail")
        assert test_app.stats.completed == 0
        with pytest.raises(LookupError, match="no such order"):
            await test_app.drain()
        assert done == ["2s"]
        await test_app.drain()  # raised once, not again
    assert [name for name, _ in test_app.task_errors] == ["shop.<locals>.explode"]


async def test_a_failure_not_drained_is_raised_when_the_block_ends() -> None:
    app, _ = shop()
    with pytest.raises(TaskFailures) as raised:
        async with app.test_app() as test_app:
            await test_app.test_client().get("/fail")
            await test_app.test_client().get("/fail")
    assert [type(exc) for exc in raised.value.exceptions] == [LookupError, LookupError]


async def test_failures_can_be_inspected_instead() -> None:
    app, _ = shop()
    async with TestApp(app, raise_task_errors=False) as test_app:
        await test_app.test_client().get("/fail")
        await test_app.drain()
    assert len(test_app.task_errors) == 1


async def test_a_failed_startup_raises_quarts_lifespan_error() -> None:
    app, _ = shop()

    @app.before_serving
    async def broken() -> None:
        raise RuntimeError("no database")

    with pytest.raises(LifespanError, match="no database"):
        async with app.test_app():
            pass


async def test_a_shutdown_timeout_too_short_raises_too_slow_and_nothing_worse(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app, done = shop()
    with pytest.raises(trio.TooSlowError):
        async with TestApp(app, shutdown_timeout=6) as test_app:
            await test_app.test_client().get("/7")
    assert trio.current_time() == pytest.approx(6)
    assert done == []
    assert test_app.nursery.stats.cancelled == 1  # cancelled with the lifespan


def test_an_apps_own_test_app_class_is_left_alone() -> None:
    class MyTestApp(TrioTestApp):
        pass

    class MyApp(QuartTrio):
        test_app_class = MyTestApp

    app = MyApp(__name__)
    trio_bg.quart_trio.init_app(app)
    assert isinstance(app.test_app(), MyTestApp)
    with pytest.raises(RuntimeError, match="init_app"):
        TestApp(QuartTrio(__name__))


async def test_without_test_app_the_tasks_run_inline_after_the_response() -> None:
    """Quart's test client alone runs no lifespan: with no nursery, the middleware runs
    a request's tasks after its response in the request's own call, one after
    another, so the client returns once they have ended; a failure is raised there."""
    app, done = shop()
    client = app.test_client()
    assert (await client.get("/0")).status_code == 200
    assert done == ["0s"]
    with pytest.raises(ExceptionGroup) as raised:  # (Quart-Trio's connection nursery)
        await client.get("/fail")
    assert raised.group_contains(LookupError, match="no such order")


async def test_without_test_app_a_websocket_sessions_tasks_run_when_it_ends() -> None:
    app, done = shop()

    async def note(what: str) -> None:
        done.append(what)

    @app.websocket("/ws")
    async def ws() -> None:
        app.add_background_task(note, "after the session")
        await websocket.send("added")

    async with app.test_client().websocket("/ws") as session:
        assert await session.receive() == "added"
        assert done == []
    assert done == ["after the session"]


async def test_the_example_with_quarts_own_test_app(
    autojump_clock: trio.testing.MockClock,
) -> None:
    example = importlib.import_module("examples.quart_trio_app")
    async with example.app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/signup", query_string={"email": "ada@example.com"})
        assert (await response.get_json())["status"] == "welcome"
        await test_app.drain()  # the 3 s e-mail, in virtual time
        assert test_app.stats.completed == 1
    assert test_app.report.all_completed
