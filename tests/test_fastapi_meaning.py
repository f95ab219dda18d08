"""FastAPI code keeps its meaning once ``trio_bg.fastapi.install`` ran: a task sees its
request's request-scoped ``yield`` dependencies still open (they exit once its tasks
have ended, the tasks one after another), a test's patch of FastAPI's ``add_task``
sees every call, and a wrong import says what to use.

Every wait is on a trio Event and bounded by ``trio.fail_after(BOUND)``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations,
# which name dependencies local to the functions that build the apps.
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated
from unittest.mock import patch

import fastapi
import pytest
import trio
from conftest import asgi_client, run_lifespan
from fastapi import BackgroundTasks, Depends, FastAPI

import trio_bg
import trio_bg.fastapi

BOUND = 10.0

REQUESTS = 30  # the nursery once let the dependency exit first in 1 to 6 of 30


class Session:
    """What a request-scoped dependency yields: open until the dependency exits."""

    def __init__(self, log: list[str]) -> None:
        self.open = True
        self.log = log

    def use(self, what: str) -> None:
        self.log.append(f"{what}: {'open' if self.open else 'CLOSED'}")


def app_with_a_session(log: list[str], **options: object) -> FastAPI:
    app = FastAPI()
    trio_bg.fastapi.install(app, grace_period=2.0, **options)  # type: ignore[arg-type]

    async def get_session() -> AsyncIterator[Session]:
        session = Session(log)
        yield session
        session.open = False
        log.append("exit")

    def get_sync_session() -> Iterator[Session]:  # (FastAPI runs it in a thread)
        session = Session(log)
        yield session
        session.open = False
        log.append("exit")

    async def async_task(session: Session, what: str) -> None:
        await trio.sleep(0.001)
        session.use(what)

    def plain_task(session: Session, what: str) -> None:
        time.sleep(0.001)
        session.use(what)

    @app.get("/async")
    async def async_endpoint(
        tasks: BackgroundTasks, session: Annotated[Session, Depends(get_session)]
    ) -> str:
        tasks.add_task(async_task, session, "async")
        tasks.add_task(plain_task, session, "plain")
        return "ok"

    @app.get("/sync")
    def sync_endpoint(
        tasks: BackgroundTasks, session: Annotated[Session, Depends(get_sync_session)]
    ) -> str:
        tasks.add_task(plain_task, session, "plain")
        tasks.add_task(async_task, session, "async")
        return "ok"

    @app.get("/function-scoped")
    async def function_scoped(
        tasks: BackgroundTasks,
        session: Annotated[Session, Depends(get_session, scope="function")],
    ) -> str:
        tasks.add_task(async_task, session, "async")
        return "ok"

    return app


@pytest.mark.parametrize("path", ["/async", "/sync"])
async def test_a_task_uses_its_requests_yield_dependency_while_it_is_open(path: str) -> None:
    log: list[str] = []
    app = app_with_a_session(log)
    async with run_lifespan(app), asgi_client(app) as client:
        with trio.fail_after(BOUND):
            for _ in range(REQUESTS):
                assert (await client.get(path)).status_code == 200
    first, second = ("async", "plain") if path == "/async" else ("plain", "async")
    # In order (they may share the session), then the dependency exits: every time.
    assert log == [f"{first}: open", f"{second}: open", "exit"] * REQUESTS
    assert trio_bg.fastapi.middleware_of(app).report.completed == 2 * REQUESTS


async def test_without_a_lifespan_the_tasks_run_inside_the_dependency_too() -> None:
    log: list[str] = []
    app = app_with_a_session(log)
    async with asgi_client(app) as client:  # no lifespan: the tasks run inline
        assert (await client.get("/async")).status_code == 200
    assert log == ["async: open", "plain: open", "exit"]


async def test_only_requests_whose_dependencies_wait_are_held() -> None:
    release = trio.Event()
    ran = trio.Event()
    app = FastAPI()
    trio_bg.fastapi.install(app, grace_period=2.0)

    async def task() -> None:
        await release.wait()
        ran.set()

    @app.get("/")
    async def endpoint(tasks: BackgroundTasks) -> list[int]:
        tasks.add_task(task)
        return [len(tasks.tasks)]  # nothing left for FastAPI to run: none held

    async with run_lifespan(app), asgi_client(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/")).json() == [0]  # returned with its task waiting
            assert not ran.is_set()
            release.set()
            await ran.wait()


async def test_a_function_scoped_dependency_exits_before_the_task_as_in_fastapi() -> None:
    log: list[str] = []
    app = app_with_a_session(log)
    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/function-scoped")).status_code == 200
        with trio.fail_after(BOUND):
            await trio_bg.fastapi.middleware_of(app).nursery.wait_idle()
    assert log == ["exit", "async: CLOSED"]


async def test_keep_dependencies_open_false_frees_the_request() -> None:
    release = trio.Event()
    log: list[str] = []
    app = FastAPI()
    trio_bg.fastapi.install(app, keep_dependencies_open=False)

    async def get_session() -> AsyncIterator[Session]:
        session = Session(log)
        yield session
        session.open = False
        log.append("exit")

    async def task(session: Session) -> None:
        await release.wait()
        session.use("task")

    @app.get("/")
    async def endpoint(
        tasks: BackgroundTasks, session: Annotated[Session, Depends(get_session)]
    ) -> str:
        tasks.add_task(task, session)
        return "ok"

    async with run_lifespan(app), asgi_client(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/")).status_code == 200  # freed, its task waiting
            assert log == ["exit"]
            release.set()
            await trio_bg.fastapi.middleware_of(app).nursery.wait_idle()
    assert log == ["exit", "task: CLOSED"]


async def test_a_held_requests_tasks_run_concurrently_when_asked() -> None:
    both_running = trio.Event()
    running = 0

    async def together() -> None:
        nonlocal running
        running += 1
        if running == 2:
            both_running.set()
        await both_running.wait()  # ordered, the first would wait here forever

    async def dependency() -> AsyncIterator[None]:
        yield

    for ordered in (False, None):
        running = 0
        both_running = trio.Event()
        app = FastAPI()
        trio_bg.fastapi.install(app, grace_period=0.5, ordered=ordered)

        @app.get("/")
        async def endpoint(tasks: BackgroundTasks, _: Annotated[None, Depends(dependency)]) -> str:
            tasks.add_task(together)
            tasks.add_task(together)
            return "ok"

        async with run_lifespan(app), asgi_client(app) as client:
            with trio.move_on_after(BOUND if ordered is False else 0.2):
                await client.get("/")
        assert both_running.is_set() == (ordered is False)


# -- mocks -----------------------------------------------------------------------------


async def send_email(address: str) -> None:
    raise AssertionError("the mock should have taken this call")


def app_adding(address: str) -> FastAPI:
    app = FastAPI()
    trio_bg.fastapi.install(app)

    @app.post("/signup")
    async def signup(tasks: BackgroundTasks) -> str:
        tasks.add_task(send_email, address)
        return "welcome"

    return app


@pytest.mark.parametrize("patching", ["string", "object"])
async def test_a_patch_of_fastapis_add_task_sees_every_call(patching: str) -> None:
    app = app_adding("ann@example.com")
    patcher = (
        patch("fastapi.BackgroundTasks.add_task")
        if patching == "string"
        else patch.object(BackgroundTasks, "add_task")
    )
    async with run_lifespan(app), asgi_client(app) as client:
        with patcher as add_task:
            assert (await client.post("/signup")).status_code == 200
        add_task.assert_called_once_with(send_email, "ann@example.com")
    report = trio_bg.fastapi.middleware_of(app).report
    assert (report.accepted, report.failed) == (0, 0)  # the real task never ran


async def test_a_bad_call_still_fails_in_the_handler() -> None:
    app = FastAPI()
    trio_bg.fastapi.install(app)

    @app.get("/")
    async def endpoint(tasks: BackgroundTasks) -> str:
        with pytest.raises(TypeError, match="not an awaitable"):
            tasks.add_task(send_email("x@example.com"))  # type: ignore[arg-type]
        return "ok"

    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/")).status_code == 200


# -- imports -----------------------------------------------------------------------------


def test_importing_background_tasks_from_trio_bg_fastapi_says_what_to_use() -> None:
    with pytest.raises(ImportError, match="keep FastAPI's own"):
        from trio_bg.fastapi import BackgroundTasks  # noqa: F401


def test_adoption_options_are_checked() -> None:
    with pytest.raises(TypeError, match="keep_dependencies_open"):
        trio_bg.fastapi.install(FastAPI(), keep_dependencies_open="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ordered"):
        trio_bg.fastapi.install(FastAPI(), ordered=1)  # type: ignore[arg-type]
    assert fastapi.BackgroundTasks.add_task.__qualname__ == "BackgroundTasks.add_task"
