"""BackgroundTaskMiddleware in-process: hand-off, discards, 503s, lifespan forwarding."""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import StartupFailed, asgi_client, run_lifespan

import trio_bg
from trio_bg._web.middleware import Message, Receive, Scope, Send

HEADERS = [(b"content-type", b"text/plain")]


async def respond(send: Send, body: bytes = b"ok", status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": HEADERS})
    await send({"type": "http.response.body", "body": body})


async def send_welcome(user: str) -> None:
    pass


async def test_tasks_are_handed_off_only_when_the_final_body_is_sent() -> None:
    ran = trio.Event()
    final_body_sent = False
    started_after_final_body: list[bool] = []

    async def job() -> None:
        started_after_final_body.append(final_body_sent)
        ran.set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal final_body_sent
        trio_bg.current_tasks().add_task(job)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await trio.testing.wait_all_tasks_blocked()  # a task started early would run now
        assert not ran.is_set()
        final_body_sent = True
        await send({"type": "http.response.body", "body": b"b"})

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        assert (await client.get("/")).text == "ab"
        await ran.wait()
    assert started_after_final_body == [True]
    assert middleware.report.completed == 1


async def test_the_scope_carries_the_same_tasks_as_current_tasks() -> None:
    seen: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["trio_bg.tasks"] is trio_bg.current_tasks())
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        await client.get("/")
    assert seen == [True]


async def test_sync_handlers_in_threads_and_child_tasks_see_current_tasks() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        def sync_handler() -> None:
            trio_bg.current_tasks().add_task(send_welcome, "from-thread")

        async def child() -> None:
            trio_bg.current_tasks().add_task(send_welcome, "from-child")

        await trio.to_thread.run_sync(sync_handler)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        assert len(trio_bg.current_tasks()) == 2
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        await client.get("/")
    assert middleware.report.completed == 2


@pytest.mark.parametrize("failure", ["raises", "returns early", "is cancelled"])
async def test_tasks_of_a_response_that_did_not_complete_are_discarded(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    waiting = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(send_welcome, "ann@example.com")
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        if failure == "raises":
            raise ValueError("handler broke")
        if failure == "is cancelled":  # as when the server gives up on a request
            waiting.set()
            await trio.sleep_forever()

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
    async with run_lifespan(middleware), httpx.AsyncClient(transport=transport) as client:

        async def request() -> None:
            with contextlib.suppress(Exception):  # httpx objects to a half response
                await client.get("http://test/welcome")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            if failure == "is cancelled":
                await waiting.wait()
                nursery.cancel_scope.cancel()
    report = middleware.report
    assert (report.accepted, report.discarded) == (0, 1)
    warning = next(r for r in caplog.records if "discarded" in r.getMessage())
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "send_welcome" in message and "/welcome" in message
    assert {"raises": "raised ValueError", "returns early": "returned without completing",
            "is cancelled": "was cancelled"}[failure] in message  # fmt: skip
    assert "ann@example.com" not in caplog.text


async def test_once_the_final_body_is_sent_the_tasks_run_whatever_the_app_does_next() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(send_welcome, "ann")
        await respond(send)
        raise RuntimeError("the app broke after its response")

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
    async with run_lifespan(middleware), httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://test/")).status_code == 200
    assert (middleware.report.completed, middleware.report.discarded) == (1, 0)


@pytest.mark.parametrize(("retry_after", "header"), [(1, "1"), (30, "30"), (None, None)])
async def test_overloaded_escaping_the_app_is_answered_503(
    retry_after: int | None, header: str | None
) -> None:
    gate = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(gate.wait)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(
        app, retry_after=retry_after, max_running=1, max_pending=0
    )
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        assert (await client.get("/")).status_code == 200
        refused = await client.get("/")
        assert refused.status_code == 503
        assert refused.headers.get("retry-after") == header
        assert middleware.nursery.stats.rejected == 1
        gate.set()
    assert middleware.report.completed == 1


async def test_overloaded_after_the_response_started_is_the_apps_to_handle() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        raise trio_bg.Overloaded("too late for a 503")

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        with pytest.raises(trio_bg.Overloaded):
            await client.get("/")


async def test_requests_without_a_lifespan_are_served_and_have_no_report() -> None:
    # Their tasks run inline (issue 9): see test_adoption.py.
    middleware = trio_bg.BackgroundTaskMiddleware(lambda scope, receive, send: respond(send))
    async with asgi_client(middleware) as client:
        assert (await client.get("/")).status_code == 200
    with pytest.raises(RuntimeError, match="not shut down"):
        middleware.report  # noqa: B018


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"grace_period": -1}, ValueError),
        ({"max_runing": 3}, TypeError),
        ({"retry_after": -1}, TypeError),
        ({"retry_after": 1.5}, TypeError),
    ],
)
def test_bad_middleware_options_fail_at_construction(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        trio_bg.BackgroundTaskMiddleware(respond, **kwargs)  # type: ignore[arg-type]


def test_the_wrapped_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="ASGI app"):
        trio_bg.BackgroundTaskMiddleware("app:app")  # type: ignore[arg-type]


# -- WebSocket ---------------------------------------------------------------------------


async def run_websocket(app: trio_bg.BackgroundTaskMiddleware) -> None:
    """One WebSocket session, ASGI-level: connect, then the client goes away."""
    inbox = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        pass

    await app({"type": "websocket", "path": "/ws", "headers": []}, receive, send)


async def test_websocket_tasks_run_after_the_session_ends() -> None:
    session_over = False
    order: list[str] = []

    async def job() -> None:
        order.append("task, session over" if session_over else "task during session")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal session_over
        await receive()
        await send({"type": "websocket.accept"})
        trio_bg.current_tasks().add_task(job)
        await receive()
        await trio.testing.wait_all_tasks_blocked()
        session_over = True

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware):
        await run_websocket(middleware)
    assert order == ["task, session over"]


async def test_websocket_tasks_are_discarded_when_the_session_fails() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(send_welcome, "x")
        raise ValueError("socket handler broke")

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware):
        with pytest.raises(ValueError):
            await run_websocket(middleware)
    assert (middleware.report.accepted, middleware.report.discarded) == (0, 1)


# -- lifespan ----------------------------------------------------------------------------


class LifespanApp:
    """An app with a lifespan of its own, recording what happens when."""

    def __init__(self, startup: str = "complete", shutdown: str = "complete") -> None:
        self.startup, self.shutdown = startup, shutdown
        self.events: list[str] = []
        self.task_done = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            trio_bg.current_tasks().add_task(self.background)
            await respond(send)
            return
        assert (await receive())["type"] == "lifespan.startup"
        self.events.append("app startup")
        await send({"type": f"lifespan.startup.{self.startup}", "message": "db down"})
        if self.startup == "failed":
            return
        assert (await receive())["type"] == "lifespan.shutdown"
        self.events.append(f"app shutdown, task done: {self.task_done}")
        await send({"type": f"lifespan.shutdown.{self.shutdown}", "message": "flush failed"})

    async def background(self) -> None:
        await trio.sleep(1)
        self.task_done = True


async def test_the_drain_runs_before_the_apps_own_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = LifespanApp()
    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware) as lifespan, asgi_client(middleware) as client:
        await client.get("/")
    assert app.events == ["app startup", "app shutdown, task done: True"]
    assert [m["type"] for m in lifespan.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_the_apps_startup_failure_is_passed_on() -> None:
    app = LifespanApp(startup="failed")
    middleware = trio_bg.BackgroundTaskMiddleware(app)
    with pytest.raises(StartupFailed, match="db down"):
        async with run_lifespan(middleware):
            pass
    assert middleware.nursery.closed


async def test_the_apps_shutdown_failure_is_passed_on() -> None:
    app = LifespanApp(shutdown="failed")
    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware) as lifespan:
        pass
    assert lifespan.sent[-1] == {"type": "lifespan.shutdown.failed", "message": "flush failed"}


@pytest.mark.parametrize("behaviour", ["raises", "returns"])
async def test_an_app_without_lifespan_support_is_still_served(behaviour: str) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if behaviour == "raises":
                raise AssertionError("only http here")
            return
        trio_bg.current_tasks().add_task(send_welcome, "x")
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        assert (await client.get("/")).status_code == 200
    assert middleware.report.completed == 1


# -- found in review -------------------------------------------------------------------


async def test_an_app_that_crashes_in_its_startup_fails_the_startup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It read lifespan.startup and raised (the database is down): not "no lifespan
    support" (that is raising before reading anything), a failed startup."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise ConnectionError("database is down")

    with pytest.raises(StartupFailed, match="database is down"):
        async with run_lifespan(trio_bg.BackgroundTaskMiddleware(app)):
            pass
    crash = next(r for r in caplog.records if r.exc_info)
    assert crash.levelno == logging.ERROR and "startup raised" in crash.getMessage()


async def test_overloaded_from_a_handlers_own_nursery_is_answered_503() -> None:
    """The handler adds its task in a nursery of its own: Overloaded comes in a group."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_bg.current_tasks().add_task, send_welcome, "x")
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, max_running=1, max_pending=0)
    gate = trio.Event()
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        middleware.nursery.start_soon(gate.wait)  # the only slot
        refused = await client.get("/")
        gate.set()
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "1")


async def test_a_task_added_after_its_request_failed_is_discarded_not_leaked() -> None:
    """A straggler (a task the handler left behind) adds to a request that is over."""
    request_over = trio.Event()
    straggler_done = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = trio_bg.current_tasks()

        async def straggler() -> None:
            await request_over.wait()
            tasks.add_task(send_welcome, "late")
            straggler_done.set()

        scope["trio_bg.tasks"]
        trio.lowlevel.spawn_system_task(straggler)
        raise ValueError("the handler broke")

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
    async with run_lifespan(middleware), httpx.AsyncClient(transport=transport) as client:
        await client.get("http://test/")
        request_over.set()
        await straggler_done.wait()
        stats = middleware.nursery.stats
        assert (stats.reserved, stats.discarded, stats.accepted) == (0, 1, 0)


async def test_with_trailers_the_tasks_wait_for_the_last_trailers() -> None:
    ran = trio.Event()
    sent: list[str] = []

    async def job() -> None:
        ran.set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(job)
        start = {"type": "http.response.start", "status": 200, "headers": [], "trailers": True}
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})
        await trio.testing.wait_all_tasks_blocked()
        sent.append(f"body sent, task ran: {ran.is_set()}")
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

    async def server_send(message: Message) -> None:
        pass

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware):
        await middleware({"type": "http", "path": "/", "headers": []}, receive, server_send)
        await ran.wait()
    assert sent == ["body sent, task ran: False"]


async def test_a_request_leaves_no_garbage_for_the_cyclic_gc() -> None:
    """Every object a request makes is freed by reference counting as soon as it is
    done: cycles on the request path (there was one in each request's collection) make
    the cyclic GC run often, and it walks every object of the server each time."""

    async def async_task() -> None:
        pass

    def plain_task() -> None:
        pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(async_task)
        trio_bg.current_tasks().add_task(plain_task)  # in a worker thread
        trio_bg.BackgroundTasks().add_task(async_task)  # Starlette's way, same collection
        await respond(send)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware):
        await middleware({"type": "http", "path": "/"}, receive, send)  # (warmed up)
        await middleware.nursery.wait_idle()
        gc.collect()
        gc.disable()
        try:
            for _ in range(100):
                await middleware({"type": "http", "path": "/"}, receive, send)
            await middleware.nursery.wait_idle()
            unreachable = gc.collect()
        finally:
            gc.enable()
    assert middleware.report.completed == 3 * 101
    # Fewer than one per request: what earlier tests left (their functions in cycles,
    # freed meanwhile) is not this request path's. A cycle per request was 3 objects each.
    assert unreachable < 100
