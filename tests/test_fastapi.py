"""FastAPI on trio (through AnyIO) with trio_bg, end to end under a real
``hypercorn.trio.serve`` on loopback and a real ``httpx.AsyncClient``.

Every wait is on a trio Event and bounded by ``trio.fail_after(BOUND)``; the only real
sleeps are the short task durations that the grace-period test is about.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import get_args

import pytest
import trio
from conftest import Recorder, served

pytest.importorskip("fastapi")

import fastapi
from fastapi import Depends, FastAPI, HTTPException

import trio_bg
import trio_bg.fastapi
from trio_bg._web.middleware import ASGIApp
from trio_bg.fastapi import Tasks

BOUND = 10.0
"""Seconds any single wait may take before the test fails (generous: a noisy CI box)."""


async def test_tasks_dependency_in_endpoints_and_dependencies() -> None:
    recorder = Recorder()
    endpoint_threads: list[threading.Thread] = []

    async def async_dependency(tasks: Tasks) -> None:
        tasks.add_task(recorder.record, "async-dependency")

    def sync_dependency(tasks: Tasks) -> None:  # FastAPI runs it in a worker thread
        assert tasks is trio_bg.current_tasks()
        tasks.add_task(recorder.record, "sync-dependency")

    app = FastAPI(dependencies=[Depends(async_dependency), Depends(sync_dependency)])
    trio_bg.fastapi.install(app, grace_period=2.0)

    @app.get("/async")
    async def async_endpoint(tasks: Tasks) -> dict[str, str]:
        assert tasks is trio_bg.current_tasks()
        tasks.add_task(recorder.record, "async-endpoint")
        return {"endpoint": "async"}

    @app.get("/sync")
    def sync_endpoint(tasks: Tasks) -> dict[str, str]:
        endpoint_threads.append(threading.current_thread())
        tasks.add_task(recorder.record, "sync-endpoint")
        return {"endpoint": "sync"}

    async with served(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/async")).json() == {"endpoint": "async"}
            assert (await client.get("/sync")).json() == {"endpoint": "sync"}
            await recorder.wait_for(6)
    assert endpoint_threads[0] is not threading.main_thread()
    assert sorted(recorder.ran) == sorted(
        ["async-dependency", "sync-dependency"] * 2 + ["async-endpoint", "sync-endpoint"]
    )
    assert trio_bg.fastapi.middleware_of(app).report.completed == 6


@pytest.mark.parametrize("form", ["add_middleware", "wrap"])
async def test_both_install_forms_see_the_lifespan_and_honour_the_grace_period(
    form: str,
) -> None:
    """``app.add_middleware(BackgroundTaskMiddleware, ...)`` and wrapping both receive
    the lifespan: the nursery is open for requests, and at shutdown a short task
    completes, a stuck one is cancelled when the grace period ends, and only then
    does FastAPI's own lifespan shut down."""
    order: list[str] = []
    started = Recorder()

    async def quick() -> None:
        await started.record("quick")
        await trio.sleep(0.2)
        order.append("quick completed")

    async def stuck() -> None:
        await started.record("stuck")
        try:
            await trio.sleep_forever()
        finally:
            order.append("stuck cancelled")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        order.append("app startup")
        yield
        order.append("app shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.post("/work")
    async def work(tasks: Tasks) -> str:
        tasks.add_task(quick)
        tasks.add_task(stuck)
        return "accepted"

    if form == "add_middleware":
        app.add_middleware(trio_bg.BackgroundTaskMiddleware, grace_period=0.5)
        served_app: ASGIApp = app
    else:
        served_app = middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=0.5)
    with trio.fail_after(BOUND):
        async with served(served_app) as client:
            assert (await client.post("/work")).json() == "accepted"
            await started.wait_for(2)
    if form == "add_middleware":
        middleware = trio_bg.fastapi.middleware_of(app)
    assert order == ["app startup", "quick completed", "stuck cancelled", "app shutdown"]
    report = middleware.report
    assert (report.completed, report.cancelled, report.unfinished) == (1, 1, (stuck.__qualname__,))
    assert 0.5 <= report.duration < BOUND


async def test_errors_isolated_and_overloaded_answers_503() -> None:
    errors: list[str] = []
    recorder = Recorder()
    release, blocker_started = trio.Event(), trio.Event()

    async def fail() -> None:
        raise ValueError("boom")

    async def blocker() -> None:
        blocker_started.set()
        await release.wait()

    app = FastAPI()
    trio_bg.fastapi.install(
        app, grace_period=2.0, max_running=1, max_pending=1, on_error=lambda n, e: errors.append(n)
    )

    @app.get("/fail-then-ok")
    async def fail_then_ok(tasks: Tasks) -> str:
        tasks.add_task(fail)
        tasks.add_task(recorder.record, "after the failure")
        return "ok"

    @app.get("/occupy")
    async def occupy(tasks: Tasks) -> str:
        tasks.add_task(blocker)
        return "occupied"

    @app.get("/two")
    async def two(tasks: Tasks) -> str:
        tasks.add_task(recorder.record, "first")  # the last free slot
        tasks.add_task(recorder.record, "second")  # Overloaded
        return "never"

    async with served(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/fail-then-ok")).json() == "ok"
            await recorder.wait_for(1)
            assert (await client.get("/occupy")).json() == "occupied"
            await blocker_started.wait()
            response = await client.get("/two")
            assert (response.status_code, response.headers["retry-after"]) == (503, "1")
            release.set()
    report = trio_bg.fastapi.middleware_of(app).report
    assert errors == [fail.__qualname__]
    assert recorder.ran == ["after the failure"]  # "first" was discarded with the 503
    assert (report.failed, report.completed, report.discarded) == (1, 2, 1)


async def test_which_error_responses_run_the_tasks() -> None:
    """An ``HTTPException`` or a validation error becomes an ordinary 4xx response,
    which completes: the tasks added before it run (FastAPI would drop its own). An
    unhandled exception reaches the installed middleware before the 500 page: its tasks
    are discarded. ``Tasks`` and FastAPI's adopted ``BackgroundTasks`` alike."""
    recorder = Recorder()
    app = FastAPI()
    trio_bg.fastapi.install(app, grace_period=2.0)

    @app.get("/not-found")
    async def not_found(tasks: Tasks, background_tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(recorder.record, "Tasks, 404")
        background_tasks.add_task(recorder.record, "BackgroundTasks, 404")
        raise HTTPException(status_code=404)

    async def dependency(background_tasks: fastapi.BackgroundTasks) -> None:
        background_tasks.add_task(recorder.record, "BackgroundTasks, 422")

    @app.get("/invalid", dependencies=[Depends(dependency)])
    async def invalid(number: int) -> int:  # the dependency runs before the check
        return number

    @app.get("/crash")
    async def crash(tasks: Tasks, background_tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(recorder.record, "Tasks, 500")
        background_tasks.add_task(recorder.record, "BackgroundTasks, 500")
        raise RuntimeError("unhandled")

    async with served(app) as client:
        with trio.fail_after(BOUND):
            assert (await client.get("/not-found")).status_code == 404
            assert (await client.get("/invalid", params={"number": "one"})).status_code == 422
            assert (await client.get("/crash")).status_code == 500
            await recorder.wait_for(3)
    report = trio_bg.fastapi.middleware_of(app).report
    assert sorted(recorder.ran) == ["BackgroundTasks, 404", "BackgroundTasks, 422", "Tasks, 404"]
    assert (report.completed, report.discarded) == (3, 2)


def test_tasks_is_an_annotated_dependency() -> None:
    base, dependency = get_args(Tasks)
    assert base is trio_bg.BackgroundTasks
    assert dependency.dependency is trio_bg.fastapi.request_tasks


async def test_the_example(monkeypatch: pytest.MonkeyPatch) -> None:
    example = importlib.import_module("examples.fastapi_app")
    order: list[str] = []
    sent = trio.Event()

    @trio_bg.task(timeout=30)
    async def send_welcome_email(email: str) -> None:  # the example's, minus the wait
        order.append(f"welcome {email}")
        sent.set()

    def write_audit_line(line: str) -> None:  # in a worker thread
        order.append(f"audit {line}")

    monkeypatch.setattr(example, "send_welcome_email", send_welcome_email)
    monkeypatch.setattr(example, "write_audit_line", write_audit_line)
    async with served(example.app) as client:
        with trio.fail_after(BOUND):
            response = await client.post("/signup", params={"email": "ada@example.com"})
            assert response.json() == {"status": "welcome", "email": "ada@example.com"}
            await sent.wait()
            stats = (await client.get("/stats")).json()
            assert stats == {"running": 0, "pending": 0, "failed": 0}
    # FastAPI's BackgroundTasks, adopted and ordered: the dependency's task first.
    assert order == ["audit signup of ada@example.com", "welcome ada@example.com"]
    assert trio_bg.fastapi.middleware_of(example.app).report.completed == 2
