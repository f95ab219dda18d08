"""Moving an existing app to trio_bg with one line (issue 9), the core of it:
``BackgroundTasks()`` as Starlette's, requests without a lifespan, event loops other
than trio, and a request's tasks in order."""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import asgi_client
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

import trio_bg
import trio_bg.starlette
from trio_bg._web.middleware import Receive, Scope, Send
from trio_bg.testing import open_test_client


async def respond(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


# -- BackgroundTasks() ----------------------------------------------------------------


async def test_background_tasks_made_in_a_request_are_that_requests_own() -> None:
    ran: list[str] = []
    seen_at_response: list[int] = []

    async def record(name: str) -> None:
        ran.append(name)

    async def endpoint(request: Request) -> Response:
        tasks = trio_bg.BackgroundTasks()  # the import swap: no arguments, as Starlette's
        tasks.add_task(record, "passed as background")
        trio_bg.BackgroundTasks().add_task(record, "never passed on")
        seen_at_response.append(len(trio_bg.current_tasks()))
        return PlainTextResponse("ok", background=tasks)

    app = trio_bg.BackgroundTaskMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with open_test_client(app) as client:
        assert (await client.get("/")).text == "ok"
        await client.drain()
        assert client.stats.completed == 2  # in the nursery, not inline
    assert sorted(ran) == ["never passed on", "passed as background"]
    assert seen_at_response == [2]


async def test_background_tasks_take_starlettes_tasks_argument() -> None:
    ran: list[int] = []

    async def endpoint(request: Request) -> Response:
        tasks = trio_bg.BackgroundTasks(tasks=[BackgroundTask(ran.append, 1)])
        return PlainTextResponse("ok", background=tasks)

    app = trio_bg.BackgroundTaskMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with open_test_client(app) as client:
        await client.get("/")
        await client.drain()
    assert ran == [1]


async def test_background_tasks_made_with_no_middleware_run_inline_as_starlettes() -> None:
    ran: list[str] = []

    async def first() -> None:
        await trio.sleep(0.01)
        ran.append("first")

    def second() -> None:
        ran.append("second")

    async def endpoint(request: Request) -> Response:
        tasks = trio_bg.BackgroundTasks()
        tasks.add_task(first)
        tasks.add_task(second)
        return PlainTextResponse("ok", background=tasks)

    async with asgi_client(Starlette(routes=[Route("/", endpoint)])) as client:
        assert (await client.get("/")).text == "ok"
    assert ran == ["first", "second"]  # in order, before the ASGI call returned


def test_background_tasks_check_the_call_at_once_even_with_no_middleware() -> None:
    async def job(n: int) -> None:
        pass

    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        trio_bg.BackgroundTasks().add_task(job)  # type: ignore[call-arg]


# -- no lifespan ------------------------------------------------------------------------


async def test_without_a_lifespan_tasks_run_inline_after_the_response_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []
    response_sent = False

    async def early() -> None:
        assert response_sent
        await trio.sleep(0.01)
        ran.append("early")

    def late() -> None:
        ran.append("late")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal response_sent
        trio_bg.current_tasks().add_task(early)
        trio_bg.current_tasks().add_task(late)
        await respond(send)
        response_sent = True

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    with caplog.at_level(logging.WARNING, "trio_bg"):
        async with asgi_client(middleware) as client:  # httpx.ASGITransport: no lifespan
            assert (await client.get("/")).text == "ok"
            assert ran == ["early", "late"]
            assert (await client.get("/")).text == "ok"
    assert ran == ["early", "late"] * 2
    assert caplog.text.count("no ASGI lifespan started") == 1  # once per middleware


async def test_without_a_lifespan_a_tasks_error_propagates_as_under_starlette() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(fails)
        await respond(send)

    transport = httpx.ASGITransport(app=trio_bg.BackgroundTaskMiddleware(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(ValueError, match="boom"):
            await client.get("/")


def starlette_app(ran: list[str]) -> Starlette:
    async def record(name: str) -> None:
        ran.append(name)

    def record_in_a_thread(name: str) -> None:
        ran.append(f"{name} in {'a worker' if threading.current_thread().daemon else 'the'}")

    async def endpoint(request: Request) -> Response:
        tasks = trio_bg.current_tasks()
        tasks.add_task(record, "async")
        tasks.add_task(record_in_a_thread, "sync")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    trio_bg.starlette.install(app)
    return app


def test_starlettes_test_client_without_a_lifespan_works_on_asyncio() -> None:
    ran: list[str] = []
    client = TestClient(starlette_app(ran), backend="asyncio")  # no `with`: no lifespan
    assert client.get("/").text == "ok"
    assert ran == ["async", "sync in a worker"]  # done before get() returned


def test_a_lifespan_on_asyncio_fails_and_says_how_to_run_on_trio() -> None:
    with pytest.raises(RuntimeError, match=r'TestClient\(app, backend="trio"\)'):  # noqa: SIM117
        with TestClient(starlette_app([]), backend="asyncio"):
            pass


def test_starlettes_test_client_on_trio_runs_the_nursery() -> None:
    ran: list[str] = []
    app = starlette_app(ran)
    with TestClient(app, backend="trio") as client:
        assert client.get("/").text == "ok"
    assert sorted(ran) == ["async", "sync in a worker"]
    assert trio_bg.starlette.middleware_of(app).report.completed == 2


# -- a request's tasks in order -----------------------------------------------------------


def ordered_app(done: list[int], *, per_request: bool) -> Any:
    async def job(n: int, seconds: float) -> None:
        await trio.sleep(seconds)
        done.append(n)

    async def fails() -> None:
        raise ValueError("not the end of the line")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = trio_bg.current_tasks()
        if per_request:
            tasks.ordered = True
        tasks.add_task(job, 1, 3)  # the slowest first: concurrently, it would end last
        tasks.add_task(fails)
        tasks.add_task(job, 2, 2)
        tasks.add_task(job, 3, 1)
        await respond(send)

    return app


@pytest.mark.parametrize("per_request", [False, True], ids=["install-option", "per-request"])
async def test_ordered_tasks_run_one_after_another_and_a_failure_does_not_stop_them(
    per_request: bool, autojump_clock: trio.testing.MockClock
) -> None:
    done: list[int] = []
    app = trio_bg.BackgroundTaskMiddleware(
        ordered_app(done, per_request=per_request), ordered=not per_request
    )
    async with open_test_client(app, raise_task_errors=False) as client:
        await client.get("/")
        stats = client.stats
        assert (stats.accepted, stats.reserved) == (1, 3)  # one at a time
        start = trio.current_time()
        await client.drain()
        assert trio.current_time() - start == 6  # 3 + 2 + 1: one after another
    assert done == [1, 2, 3]
    assert (client.report.completed, client.report.failed) == (3, 1)


async def test_ordered_tasks_left_at_the_deadline_are_cancelled_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(2_000):  # a long chain: ended in a loop, not by recursion
            trio_bg.current_tasks().add_task(trio.sleep, 1)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, ordered=True, grace_period=5.5)
    async with open_test_client(middleware) as client:
        await client.get("/")
    report = client.report
    assert (report.accepted, report.completed, report.cancelled) == (2_000, 5, 1_995)


@pytest.mark.parametrize("per_request", [False, True], ids=["middleware-option", "per-request"])
async def test_stop_on_failure_skips_the_rest_as_starlette_does(
    per_request: bool, autojump_clock: trio.testing.MockClock
) -> None:
    done: list[int] = []

    async def job(n: int) -> None:
        await trio.sleep(1)
        done.append(n)

    async def fails() -> None:
        raise ValueError("the rest is skipped")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = trio_bg.current_tasks()
        if per_request:
            tasks.stop_on_failure = True
            assert tasks.ordered
        tasks.add_task(job, 1)
        tasks.add_task(fails)
        tasks.add_task(job, 2)
        tasks.add_task(job, 3)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, stop_on_failure=not per_request)
    async with open_test_client(middleware, raise_task_errors=False) as client:
        await client.get("/")
        await client.drain()
        stats = client.stats
    assert done == [1]
    assert (stats.accepted, stats.completed, stats.failed, stats.cancelled) == (4, 1, 1, 2)


def test_ordered_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="ordered must be True or False"):
        trio_bg.BackgroundTaskMiddleware(respond, ordered="yes")  # type: ignore[arg-type]
