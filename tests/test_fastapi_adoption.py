"""FastAPI's own ``BackgroundTasks``, adopted by ``trio_bg.fastapi.install``: unchanged
endpoints and dependencies whose tasks run in trio_bg's nursery, after the response.

Every wait is on a trio Event (or virtual time) and bounded by ``trio.fail_after(BOUND)``.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import fastapi
import pytest
import trio
import trio.testing
from conftest import Recorder, asgi_client, served
from fastapi import APIRouter, Depends, FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.testclient import TestClient

import trio_bg
import trio_bg.fastapi
from trio_bg._web.middleware import ASGIApp, Message, Receive, Scope, Send
from trio_bg.testing import open_test_client

BOUND = 10.0
"""Seconds any single wait may take before the test fails (generous: a noisy CI box)."""


def observed(app: ASGIApp, response_sent: trio.Event, call_returned: trio.Event) -> ASGIApp:
    """``app``, as the server sees it: ``response_sent`` once the final body went to
    the server, ``call_returned`` once the request's ASGI call has returned."""

    async def outside(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                response_sent.set()

        await app(scope, receive, watch)
        call_returned.set()

    return outside


async def test_tasks_start_after_the_response_outside_the_request() -> None:
    """Unchanged FastAPI code, in an ``async def`` and a plain ``def`` endpoint, under a
    real Hypercorn: each task starts once the response went to the server, and runs
    outside the request's ASGI call (inline, as FastAPI runs it, it would wait forever
    for that call to return)."""
    paths = ("/async", "/sync")
    response_sent = {path: trio.Event() for path in paths}
    call_returned = {path: trio.Event() for path in paths}
    started_after_the_response: dict[str, bool] = {}
    done = Recorder()

    async def job(path: str) -> None:
        started_after_the_response[path] = response_sent[path].is_set()
        await call_returned[path].wait()
        await done.record(path)

    def plain_job(path: str) -> None:  # one of trio_bg's worker threads
        trio.from_thread.run(job, path)

    app = FastAPI()
    trio_bg.fastapi.install(app, grace_period=2.0)

    @app.get("/async")
    async def async_endpoint(background_tasks: fastapi.BackgroundTasks) -> list[int]:
        background_tasks.add_task(job, "/async")
        return [len(background_tasks.tasks), len(trio_bg.current_tasks())]

    @app.get("/sync")
    def sync_endpoint(background_tasks: fastapi.BackgroundTasks) -> list[int]:
        assert type(background_tasks) is fastapi.BackgroundTasks  # FastAPI's own
        background_tasks.add_task(plain_job, "/sync")
        return [len(background_tasks.tasks), len(trio_bg.current_tasks())]

    async def by_path(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path in paths:
            await observed(app, response_sent[path], call_returned[path])(scope, receive, send)
        else:
            await app(scope, receive, send)

    async with served(by_path) as client:
        with trio.fail_after(BOUND):
            for path in paths:
                # Nothing left in FastAPI's list (to run inline); one in trio_bg's.
                assert (await client.get(path)).json() == [0, 1]
            await done.wait_for(2)
    assert started_after_the_response == {"/async": True, "/sync": True}
    assert trio_bg.fastapi.middleware_of(app).report.completed == 2


def app_with_tasks_everywhere(
    record: Callable[[str], Awaitable[None]], *, ordered: bool
) -> FastAPI:
    """One request whose app-level dependency, sub-dependencies (``async def`` and plain
    ``def``, which FastAPI runs in a worker thread) and endpoint each add a task to
    FastAPI's one ``BackgroundTasks`` of the request. The earlier a task is added, the
    longer it takes: run concurrently, they end in the reverse order."""
    instances: set[int] = set()

    async def take(name: str, seconds: int) -> None:
        await trio.sleep(seconds)
        await record(name)

    async def app_level(background_tasks: fastapi.BackgroundTasks) -> None:
        instances.add(id(background_tasks))
        background_tasks.add_task(take, "app-level", 4)

    async def async_dependency(background_tasks: fastapi.BackgroundTasks) -> None:
        instances.add(id(background_tasks))
        background_tasks.add_task(take, "async dependency", 3)

    def sync_dependency(background_tasks: fastapi.BackgroundTasks) -> None:
        assert threading.current_thread() is not threading.main_thread()
        instances.add(id(background_tasks))
        background_tasks.add_task(take, "sync dependency", 2)

    app = FastAPI(dependencies=[Depends(app_level)])
    trio_bg.fastapi.install(app, ordered=ordered)

    @app.post("/", dependencies=[Depends(async_dependency), Depends(sync_dependency)])
    async def endpoint(background_tasks: fastapi.BackgroundTasks) -> dict[str, Any]:
        instances.add(id(background_tasks))
        background_tasks.add_task(take, "endpoint", 1)
        tasks = trio_bg.current_tasks()
        return {"instances": len(instances), "collected": len(tasks), "ordered": tasks.ordered}

    return app


@pytest.mark.parametrize("ordered", [False, True], ids=["concurrent", "ordered"])
async def test_tasks_of_dependencies_and_the_endpoint_on_one_request(
    ordered: bool, autojump_clock: trio.testing.MockClock
) -> None:
    done = Recorder()
    app = app_with_tasks_everywhere(done.record, ordered=ordered)
    async with open_test_client(app) as client:
        response = await client.post("/")
        assert response.json() == {"instances": 1, "collected": 4, "ordered": ordered}
        start = trio.current_time()
        await client.drain()
        elapsed = trio.current_time() - start
    added = ["app-level", "async dependency", "sync dependency", "endpoint"]
    if ordered:  # FastAPI's order, one after another (what its docs' tutorial002 relies on)
        assert (done.ran, elapsed) == (added, 4 + 3 + 2 + 1)
    else:  # trio_bg's default: all at once
        assert (done.ran, elapsed) == (added[::-1], 4)
    assert client.report.completed == 4


async def test_a_bad_call_raises_type_error_in_the_handler() -> None:
    """Through FastAPI's ``BackgroundTasks``, a call that could never run fails at
    ``add_task``, in the endpoint (FastAPI would fail after the response, in the
    background)."""
    done = Recorder()

    async def job(n: int) -> None:
        await done.record(f"job {n}")

    app = FastAPI()
    trio_bg.fastapi.install(app)

    @app.get("/")
    async def endpoint(background_tasks: fastapi.BackgroundTasks) -> list[str]:
        errors = []
        bad_calls: list[Callable[[], None]] = [
            lambda: background_tasks.add_task(job),  # type: ignore[call-arg]
            lambda: background_tasks.add_task(job, 1, 2),  # type: ignore[call-arg]
            lambda: background_tasks.add_task(job(1)),  # type: ignore[arg-type]
            lambda: background_tasks.add_task("job"),  # type: ignore[arg-type]
        ]
        for call in bad_calls:
            try:
                call()
            except TypeError as exc:
                errors.append(str(exc))
        background_tasks.add_task(job, 1)
        return errors

    async with open_test_client(app) as client:
        errors = (await client.get("/")).json()
        await client.drain()
    assert len(errors) == 4
    assert "missing 1 required positional argument: 'n'" in errors[0]
    assert "takes 1 positional argument but 2 were given" in errors[1]
    assert "not an awaitable" in errors[2]
    assert "takes a callable" in errors[3]
    assert done.ran == ["job 1"]
    assert client.report.completed == 1


@pytest.mark.parametrize("own", ["injected instance", "trio_bg.current_tasks()", "Starlette's"])
async def test_a_response_with_its_own_background_drops_no_task(own: str) -> None:
    """fastapi#11215: an endpoint returns a ``Response`` with a ``background`` of its own,
    and FastAPI silently drops the tasks added to the injected ``BackgroundTasks``.
    Adopted, those tasks were handed to trio_bg as they were added: none is dropped,
    all run in the nursery after the response, as do the response's own tasks when
    they are trio_bg's. A hand-made Starlette ``BackgroundTask`` is the response's
    own business: Starlette runs it inline, after the body, as ever."""
    response_sent, call_returned = trio.Event(), trio.Event()
    in_the_nursery = Recorder()
    inline: list[str] = []

    async def outside(name: str) -> None:
        assert response_sent.is_set()
        await call_returned.wait()  # inline, this would never return
        await in_the_nursery.record(name)

    async def inside(name: str) -> None:
        assert response_sent.is_set() and not call_returned.is_set()
        inline.append(name)

    app = FastAPI()
    trio_bg.fastapi.install(app)

    @app.get("/")
    async def endpoint(background_tasks: fastapi.BackgroundTasks) -> PlainTextResponse:
        background_tasks.add_task(outside, "injected")  # FastAPI drops this one
        if own == "Starlette's":
            return PlainTextResponse("ok", background=BackgroundTask(inside, "own"))
        background = background_tasks if own == "injected instance" else trio_bg.current_tasks()
        background.add_task(outside, "own")
        return PlainTextResponse("ok", background=background)  # type: ignore[arg-type]

    async with open_test_client(observed(app, response_sent, call_returned)) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/")).text == "ok"
            await client.drain()
    if own == "Starlette's":
        assert (in_the_nursery.ran, inline) == (["injected"], ["own"])
    else:
        assert (sorted(in_the_nursery.ran), inline) == (["injected", "own"], [])
    assert client.report.completed == len(in_the_nursery.ran)


async def test_a_shared_response_object_replays_no_task() -> None:
    """Also fastapi#11215: FastAPI attaches the first request's ``BackgroundTasks`` to a
    ``Response`` object that endpoints share, and runs it again for every later request
    (which loses its own tasks). Adopted, each request's tasks run once."""
    done = Recorder()
    shared = PlainTextResponse("ok")
    app = FastAPI()
    trio_bg.fastapi.install(app)

    @app.get("/{n}")
    async def endpoint(n: int, background_tasks: fastapi.BackgroundTasks) -> PlainTextResponse:
        background_tasks.add_task(done.record, f"request {n}")
        return shared

    async with open_test_client(app) as client:
        for n in (1, 2, 3):
            assert (await client.get(f"/{n}")).text == "ok"
        await client.drain()
    assert sorted(done.ran) == ["request 1", "request 2", "request 3"]


async def test_routers_included_after_install_are_adopted() -> None:
    """FastAPI applies app-level dependencies at ``include_router`` time, to the
    router's routes then and later, nested routers included: all adopted. So are
    routes with dependency overrides."""
    done = Recorder()
    app = FastAPI()
    trio_bg.fastapi.install(app)

    async def endpoint(request: fastapi.Request, background_tasks: fastapi.BackgroundTasks) -> Any:
        background_tasks.add_task(done.record, request.url.path)
        return [len(background_tasks.tasks), len(trio_bg.current_tasks())]

    async def original() -> str:
        return "original"

    async def override() -> str:
        return "override"

    inner = APIRouter()
    inner.add_api_route("/inner", endpoint)
    outer = APIRouter(prefix="/outer")
    outer.include_router(inner)  # before outer is included in the app
    app.include_router(outer)
    late = APIRouter()
    app.include_router(late, prefix="/late")
    late.add_api_route("/added-after-include", endpoint)
    app.add_api_route("/overridden", endpoint, dependencies=[Depends(original)])
    app.dependency_overrides[original] = override

    paths = ["/outer/inner", "/late/added-after-include", "/overridden"]
    async with open_test_client(app) as client:
        for path in paths:
            assert (await client.get(path)).json() == [0, 1], path
        await client.drain()
    assert sorted(done.ran) == sorted(paths)


def test_install_after_the_routes_is_refused() -> None:
    """Routes added before ``install`` would keep FastAPI's own ``BackgroundTasks``:
    ``install`` refuses such an app, changing nothing. Starlette's plain routes and
    mounts are no obstacle (FastAPI's own docs routes are such)."""

    async def endpoint(background_tasks: fastapi.BackgroundTasks) -> None:
        pass

    early = FastAPI()
    early.add_api_route("/early", endpoint)
    with pytest.raises(RuntimeError, match=r"must come before the app's routes.*: /early$"):
        trio_bg.fastapi.install(early)
    assert (early.router.dependencies, early.user_middleware) == ([], [])

    included = FastAPI()
    included.include_router(APIRouter())
    with pytest.raises(RuntimeError, match="already added: an included router"):
        trio_bg.fastapi.adopt_background_tasks(included)

    starlette_only = FastAPI()
    starlette_only.add_route("/plain", lambda request: PlainTextResponse("plain"))
    starlette_only.mount("/sub", Starlette())
    trio_bg.fastapi.install(starlette_only)
    starlette_only.add_api_route("/later", endpoint)
    trio_bg.fastapi.adopt_background_tasks(starlette_only)  # adopted already: nothing to do
    assert len(starlette_only.router.dependencies) == 1


async def test_tasks_added_before_the_adoption_move_over() -> None:
    """A dependency solved before trio_bg's (one put first later) uses FastAPI's own
    ``add_task``: its tasks move to trio_bg all the same, in their place, and run once."""
    done = Recorder()
    app = FastAPI()
    trio_bg.fastapi.install(app, ordered=True)

    async def first(background_tasks: fastapi.BackgroundTasks) -> None:
        background_tasks.add_task(done.record, "added before")
        assert len(background_tasks.tasks) == 1  # still FastAPI's add_task

    app.router.dependencies.insert(0, Depends(first))

    @app.get("/")
    async def endpoint(background_tasks: fastapi.BackgroundTasks) -> list[int]:
        background_tasks.add_task(done.record, "added after")
        return [len(background_tasks.tasks), len(trio_bg.current_tasks())]

    async with open_test_client(app) as client:
        assert (await client.get("/")).json() == [0, 2]
        await client.drain()
    assert done.ran == ["added before", "added after"]
    assert client.report.completed == 2


def test_install_leaves_the_openapi_schema_alone() -> None:
    def build(install: bool) -> FastAPI:
        app = FastAPI()
        if install:
            trio_bg.fastapi.install(app)

        @app.post("/items/{item_id}")
        async def create(
            item_id: int, q: str, background_tasks: fastapi.BackgroundTasks
        ) -> dict[str, int]:
            return {"item_id": item_id}

        return app

    assert build(install=True).openapi() == build(install=False).openapi()


def test_trio_bg_fastapi_has_no_background_tasks_to_import() -> None:
    """``from trio_bg.fastapi import BackgroundTasks`` would be neither FastAPI's class
    (the annotation that works) nor a valid annotation: it is not there to import."""
    assert "BackgroundTasks" not in vars(trio_bg.fastapi)
    with pytest.raises(ImportError, match="BackgroundTasks"):
        from trio_bg.fastapi import BackgroundTasks  # noqa: F401
    assert all(hasattr(trio_bg.fastapi, name) for name in trio_bg.fastapi.__all__)


async def test_adopt_background_tasks_alone() -> None:
    """Where the middleware comes another way: an app wrapped in it, or a FastAPI app
    mounted in an installed one (its tasks go to the outer app's nursery)."""
    done = Recorder()

    def app_adding_a_task(name: str) -> FastAPI:
        app = FastAPI()
        trio_bg.fastapi.adopt_background_tasks(app)

        @app.get("/")
        async def endpoint(background_tasks: fastapi.BackgroundTasks) -> list[int]:
            background_tasks.add_task(done.record, name)
            return [len(background_tasks.tasks), len(trio_bg.current_tasks())]

        return app

    wrapped = trio_bg.BackgroundTaskMiddleware(app_adding_a_task("wrapped"))
    outer = FastAPI()
    trio_bg.fastapi.install(outer)
    outer.mount("/sub", app_adding_a_task("mounted"))
    for app, path in [(wrapped, "/"), (outer, "/sub/")]:
        async with open_test_client(app) as client:
            assert (await client.get(path)).json() == [0, 1]
            await client.drain()
        assert client.report.completed == 1
    assert done.ran == ["wrapped", "mounted"]


async def test_with_no_middleware_fastapi_runs_its_tasks_as_ever() -> None:
    """An adopted app served with no middleware at all (a mounted app, tested alone):
    FastAPI's tasks run inline after the response, as trio_bg's own do there."""
    ran: list[str] = []
    app = FastAPI()
    trio_bg.fastapi.adopt_background_tasks(app)

    @app.get("/")
    async def endpoint(background_tasks: fastapi.BackgroundTasks) -> int:
        background_tasks.add_task(ran.append, "inline")
        return len(background_tasks.tasks)

    async with asgi_client(app) as client:  # httpx.ASGITransport waits for the ASGI call
        assert (await client.get("/")).json() == 1
        assert ran == ["inline"]


async def test_without_adoption_fastapi_runs_its_own_tasks_inline() -> None:
    """The way to keep FastAPI's semantics for its ``BackgroundTasks``: the middleware
    without `install` (no adoption). Its tasks run inline, inside the request's ASGI
    call; ``Tasks`` still run in the nursery."""
    response_sent, call_returned = trio.Event(), trio.Event()
    inline: list[bool] = []
    in_the_nursery = trio.Event()

    async def fastapi_job() -> None:
        inline.append(response_sent.is_set() and not call_returned.is_set())

    async def trio_bg_job() -> None:
        await call_returned.wait()  # inline, this would never return
        in_the_nursery.set()

    app = FastAPI()
    app.add_middleware(trio_bg.BackgroundTaskMiddleware)

    @app.get("/")
    async def endpoint(
        background_tasks: fastapi.BackgroundTasks, tasks: trio_bg.fastapi.Tasks
    ) -> str:
        background_tasks.add_task(fastapi_job)
        tasks.add_task(trio_bg_job)
        return "ok"

    async with served(observed(app, response_sent, call_returned)) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/")).json() == "ok"
            await in_the_nursery.wait()
    assert inline == [True]


def test_websocket_tasks_run_after_the_session() -> None:
    """FastAPI never runs the ``BackgroundTasks`` of a WebSocket endpoint; adopted, they
    run after the session ends, as trio_bg's do. (Starlette's ``TestClient`` on trio,
    with its lifespan: leaving its block drains the tasks.)"""
    ran: list[str] = []
    closed: list[bool] = []

    def job() -> None:
        ran.append("after the session" if closed else "during the session")

    app = FastAPI()
    trio_bg.fastapi.install(app)

    @app.websocket("/ws")
    async def session(websocket: WebSocket, background_tasks: fastapi.BackgroundTasks) -> None:
        await websocket.accept()
        background_tasks.add_task(job)
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()
        closed.append(True)

    with TestClient(app, backend="trio") as client, client.websocket_connect("/ws") as websocket:
        websocket.send_text("hello")
        assert websocket.receive_text() == "hello"
    assert ran == ["after the session"]
    assert trio_bg.fastapi.middleware_of(app).report.completed == 1
