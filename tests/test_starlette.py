"""Starlette on trio (through AnyIO) with trio_bg, end to end under a real
``hypercorn.trio.serve`` on loopback and a real ``httpx.AsyncClient``.

Every wait is on a trio Event and bounded by ``trio.fail_after(BOUND)``; the only real
sleeps are the short task durations that the grace-period tests are about.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from conftest import served

pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.background import BackgroundTask as StarletteBackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import trio_bg
import trio_bg.starlette
from trio_bg._web.middleware import ASGIApp, Receive, Scope, Send

BOUND = 10.0
"""Seconds any single wait may take before the test fails (generous: a noisy CI box)."""


def recording_returns(app: ASGIApp, returned: dict[str, trio.Event]) -> ASGIApp:
    """Wrap ``app``; set ``returned[path]`` once the ASGI call for ``path`` returned."""

    async def recorder(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope["path"] in returned:
                returned[scope["path"]].set()

    return recorder


async def test_current_tasks_in_async_and_sync_endpoints_and_in_middleware() -> None:
    ran: list[str] = []
    all_ran = trio.Event()
    thread_of_sync_endpoint: list[threading.Thread] = []

    async def record(name: str) -> None:
        ran.append(name)
        if len(ran) == 6:  # three tasks for each of the two requests
            all_ran.set()

    def inner_asgi(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                trio_bg.current_tasks().add_task(record, "pure-asgi")
            await app(scope, receive, send)

        return middleware

    class Dispatch(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            trio_bg.current_tasks().add_task(record, "base-http")
            return await call_next(request)

    async def async_endpoint(request: Request) -> Response:
        trio_bg.current_tasks().add_task(record, "async-endpoint")
        return PlainTextResponse("async")

    def sync_endpoint(request: Request) -> Response:
        thread_of_sync_endpoint.append(threading.current_thread())
        trio_bg.current_tasks().add_task(record, "sync-endpoint")
        return PlainTextResponse("sync")

    app = Starlette(
        routes=[Route("/async", async_endpoint), Route("/sync", sync_endpoint)],
        middleware=[Middleware(Dispatch), Middleware(inner_asgi)],
    )
    trio_bg.starlette.install(app, grace_period=2.0)  # outermost of the user's middleware
    async with served(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/async")).text == "async"
            assert (await client.get("/sync")).text == "sync"
            await all_ran.wait()
    assert thread_of_sync_endpoint[0] is not threading.main_thread()
    assert sorted(ran) == sorted(
        ["pure-asgi", "base-http"] * 2 + ["async-endpoint", "sync-endpoint"]
    )


async def test_dropin_background_runs_in_the_nursery_not_inline() -> None:
    """The same endpoint shape as Starlette's ``Response(background=tasks)``: Starlette's
    own tasks run inside the request's ASGI call; trio_bg's run in the server nursery,
    so a trio_bg task can wait for the request's call to return (inline, it would
    deadlock and fail the bound)."""
    returned = {path: trio.Event() for path in ("/starlette", "/trio-bg", "/typed")}
    starlette_task_saw_call_returned: list[bool] = []
    trio_bg_task_done = {"/trio-bg": trio.Event(), "/typed": trio.Event()}

    async def starlette_job() -> None:
        starlette_task_saw_call_returned.append(returned["/starlette"].is_set())

    async def trio_bg_job(path: str) -> None:
        await returned[path].wait()  # only possible outside the request's call
        trio_bg_task_done[path].set()

    async def with_starlette(request: Request) -> Response:
        tasks = StarletteBackgroundTasks()
        tasks.add_task(starlette_job)
        return PlainTextResponse("queued", background=tasks)

    async def with_trio_bg(request: Request) -> Response:
        tasks = trio_bg.current_tasks()  # was: tasks = BackgroundTasks()
        tasks.add_task(trio_bg_job, "/trio-bg")
        return PlainTextResponse("queued", background=tasks)  # type: ignore[arg-type]

    async def typed(request: Request) -> Response:
        tasks = trio_bg.current_tasks()  # what Starlette's annotation accepts:
        tasks.add_task(trio_bg_job, "/typed")
        return PlainTextResponse("queued", background=StarletteBackgroundTask(tasks))

    app = Starlette(
        routes=[
            Route("/starlette", with_starlette),
            Route("/trio-bg", with_trio_bg),
            Route("/typed", typed),
        ]
    )
    trio_bg.starlette.install(app, grace_period=2.0)
    async with served(recording_returns(app, returned)) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/starlette")).text == "queued"
            await returned["/starlette"].wait()
            assert (await client.get("/trio-bg")).text == "queued"
            assert (await client.get("/typed")).text == "queued"
            await trio_bg_task_done["/trio-bg"].wait()
            await trio_bg_task_done["/typed"].wait()
        assert trio_bg.starlette.middleware_of(app).nursery.stats.completed == 2
    assert starlette_task_saw_call_returned == [False]  # Starlette's ran inline


async def test_tasks_run_concurrently_and_a_failure_skips_nothing() -> None:
    """Starlette runs a response's tasks one by one and stops at the first error;
    trio_bg runs them concurrently and a failing one affects no other."""
    errors: list[tuple[str, BaseException]] = []
    a_started, b_started, both_done = trio.Event(), trio.Event(), trio.Event()
    done: list[str] = []

    async def fail() -> None:
        raise ValueError("boom")

    async def rendezvous(mine: trio.Event, other: trio.Event, name: str) -> None:
        mine.set()
        await other.wait()  # run one after the other, this would never return
        done.append(name)
        if len(done) == 2:
            both_done.set()

    async def endpoint(request: Request) -> Response:
        tasks = trio_bg.current_tasks()
        tasks.add_task(fail)
        tasks.add_task(rendezvous, a_started, b_started, "a")
        tasks.add_task(rendezvous, b_started, a_started, "b")
        return PlainTextResponse("ok", background=tasks)  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/", endpoint)])
    trio_bg.starlette.install(app, grace_period=2.0, on_error=lambda n, e: errors.append((n, e)))
    async with served(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/")).status_code == 200
            await both_done.wait()
            assert (await client.get("/")).status_code == 200  # the server lives on
    report = trio_bg.starlette.middleware_of(app).report
    assert (report.failed, report.completed) == (2, 4)
    assert [name for name, _ in errors] == [fail.__qualname__] * 2
    assert all(isinstance(error, ValueError) for _, error in errors)


@pytest.mark.parametrize("placement", ["install", "wrap-outside"])
async def test_a_failed_request_discards_its_tasks_only_when_installed_inside(
    placement: str,
) -> None:
    """Installed in the app's stack, the middleware sees an endpoint's exception before
    Starlette's ServerErrorMiddleware answers 500: the tasks are discarded. Wrapped
    around the whole app, the 500 page completes the response first: the tasks run."""
    ran = trio.Event()

    async def job() -> None:
        ran.set()

    async def endpoint(request: Request) -> Response:
        trio_bg.current_tasks().add_task(job)
        raise RuntimeError("the endpoint failed")

    starlette_app = Starlette(routes=[Route("/", endpoint)])
    if placement == "install":
        trio_bg.starlette.install(starlette_app, grace_period=2.0)
        served_app: ASGIApp = starlette_app
    else:
        middleware = trio_bg.BackgroundTaskMiddleware(starlette_app, grace_period=2.0)
        served_app = middleware
    async with served(served_app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/")).status_code == 500
            if placement == "wrap-outside":
                await ran.wait()
    if placement == "install":
        report = trio_bg.starlette.middleware_of(starlette_app).report
        assert (report.discarded, report.accepted) == (1, 0)
        assert not ran.is_set()
    else:
        assert (middleware.report.discarded, middleware.report.completed) == (0, 1)


@pytest.mark.parametrize("placement", ["install", "wrap-outside-with-handler"])
async def test_overloaded_answers_503_and_discards_the_request_tasks(placement: str) -> None:
    release = trio.Event()
    blocker_started = trio.Event()
    ran: list[str] = []

    async def blocker() -> None:
        blocker_started.set()
        await release.wait()

    async def job(name: str) -> None:
        ran.append(name)

    async def occupy(request: Request) -> Response:
        trio_bg.current_tasks().add_task(blocker)
        return PlainTextResponse("occupied")

    async def two_tasks(request: Request) -> Response:
        tasks = trio_bg.current_tasks()
        tasks.add_task(job, "first")  # takes the last pending slot
        tasks.add_task(job, "second")  # Overloaded
        return PlainTextResponse("never")

    routes = [Route("/occupy", occupy), Route("/two", two_tasks)]
    options = {"grace_period": 2.0, "max_running": 1, "max_pending": 1}
    if placement == "install":
        app = Starlette(routes=routes)
        trio_bg.starlette.install(app, retry_after=7, **options)  # type: ignore[arg-type]
        served_app: ASGIApp = app
    else:
        app = Starlette(
            routes=routes,
            exception_handlers={trio_bg.Overloaded: trio_bg.starlette.overloaded_handler},
        )
        served_app = middleware = trio_bg.BackgroundTaskMiddleware(app, **options)  # type: ignore[arg-type]
    async with served(served_app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/occupy")).text == "occupied"
            await blocker_started.wait()
            response = await client.get("/two")
            assert response.status_code == 503
            assert response.headers["retry-after"] == ("7" if placement == "install" else "1")
            release.set()
    report = (trio_bg.starlette.middleware_of(app) if placement == "install" else middleware).report
    assert (report.accepted, report.completed, report.discarded) == (1, 1, 1)
    assert ran == []


async def test_grace_period_at_shutdown_then_the_app_lifespan() -> None:
    """At shutdown a short task still completes, a stuck one is cancelled when the grace
    period ends and named in the report; Starlette's own lifespan shutdown runs after."""
    order: list[str] = []
    both_started = trio.Event()
    started: list[str] = []

    async def quick() -> None:
        started.append("quick")
        if len(started) == 2:
            both_started.set()
        await trio.sleep(0.2)
        order.append("quick completed")

    async def stuck() -> None:
        started.append("stuck")
        if len(started) == 2:
            both_started.set()
        try:
            await trio.sleep_forever()
        finally:
            order.append("stuck cancelled")

    async def endpoint(request: Request) -> Response:
        trio_bg.current_tasks().add_task(quick)
        trio_bg.current_tasks().add_task(stuck)
        return PlainTextResponse("ok")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        order.append("app shutdown")

    app = Starlette(routes=[Route("/", endpoint)], lifespan=lifespan)
    trio_bg.starlette.install(app, grace_period=0.5)
    with trio.fail_after(BOUND):
        async with served(app) as client:
            assert (await client.get("/")).text == "ok"
            await both_started.wait()
            # leaving the block shuts the server down gracefully
    report = trio_bg.starlette.middleware_of(app).report
    assert order == ["quick completed", "stuck cancelled", "app shutdown"]
    assert (report.completed, report.cancelled) == (1, 1)
    assert report.unfinished == (stuck.__qualname__,)
    assert 0.5 <= report.duration < BOUND


async def test_current_tasks_from_a_starlette_background_thread() -> None:
    """Mixed code: Starlette's own background runs a plain function in a thread after the
    response; there `current_tasks()` is the (already handed off) request's tasks, and
    a task added from that thread goes to the nursery at once."""
    child_ran = trio.Event()
    parent_done = trio.Event()

    async def child() -> None:
        child_ran.set()

    def parent() -> None:
        try:
            trio_bg.current_tasks().add_task(child)
        finally:
            trio.from_thread.run_sync(parent_done.set)

    async def endpoint(request: Request) -> Response:
        tasks = StarletteBackgroundTasks()
        tasks.add_task(parent)
        return PlainTextResponse("ok", background=tasks)

    app = Starlette(routes=[Route("/", endpoint)])
    trio_bg.starlette.install(app, grace_period=1.0)
    async with served(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/")).text == "ok"
            await parent_done.wait()
            await child_ran.wait()


def test_install_rejects_bad_options() -> None:
    app = Starlette()
    with pytest.raises(TypeError, match="retry_after"):
        trio_bg.starlette.install(app, retry_after=-1)
    with pytest.raises(ValueError, match="grace_period"):
        trio_bg.starlette.install(app, grace_period=-1)
    assert app.user_middleware == []  # nothing half-installed
    with pytest.raises(RuntimeError, match="install"):
        trio_bg.starlette.middleware_of(app)


async def test_the_dropin_example(monkeypatch: pytest.MonkeyPatch) -> None:
    example = importlib.import_module("examples.starlette_dropin")
    done: list[tuple[str, int]] = []
    both_done = trio.Event()

    def record(name: str, order_id: int) -> None:
        done.append((name, order_id))
        if len(done) == 2:
            both_done.set()

    async def send_receipt(order_id: int) -> None:  # the example's, minus the wait
        record("receipt", order_id)

    def notify_warehouse(order_id: int) -> None:
        trio.from_thread.run_sync(record, "warehouse", order_id)

    monkeypatch.setattr(example, "send_receipt", send_receipt)
    monkeypatch.setattr(example, "notify_warehouse", notify_warehouse)
    async with served(example.app) as client:
        with trio.fail_after(BOUND):
            assert (await client.post("/orders/42")).json() == {"order": 42}
            await both_done.wait()
    assert sorted(done) == [("receipt", 42), ("warehouse", 42)]
    assert trio_bg.starlette.middleware_of(example.app).report.completed == 2
