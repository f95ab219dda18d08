# Ported from Starlette, tests/test_background.py (encode/starlette, commit cb8f84f5),
# Copyright (c) 2018, Encode OSS Ltd. All rights reserved. BSD 3-Clause licence: see
# https://github.com/encode/starlette/blob/master/LICENSE.md
#
# What changed: `BackgroundTasks` comes from trio_bg (the one-line migration), and the
# `test_client_factory` fixture runs every case in five setups (below). The test bodies
# are Starlette's, but for one assertion whose meaning trio_bg changes on purpose: in
# the nursery a failing task does not skip the next one.
"""Starlette's own background-task tests, with ``from trio_bg import BackgroundTasks``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

import trio_bg
from trio_bg import BackgroundTasks  # was: from starlette.background import BackgroundTasks

with warnings.catch_warnings():
    # Starlette 1.10's TestClient prefers httpx2, and warns once when it finds httpx.
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from trio_bg.starlette import TestClient

TestClientFactory = Callable[[ASGIApp], TestClient]

SETUPS = {
    # Starlette's own setup: a bare app; trio_bg.BackgroundTasks runs inline, as
    # Starlette's does, on either event loop.
    "bare-asyncio": ("asyncio", False, False),
    "bare-trio": ("trio", False, False),
    # The app in trio_bg's middleware, but no lifespan (no `with`): inline after the
    # response, in the request's call.
    "middleware-asyncio": ("asyncio", True, False),
    "middleware-trio": ("trio", True, False),
    # `with TestClient(app)`: the lifespan opens the nursery; the client drains after
    # each request and raises the tasks' failures.
    "middleware-lifespan": ("trio", True, True),
}


def http_only(app: ASGIApp) -> ASGIApp:
    """``app`` declining the lifespan, as the ASGI way goes: Starlette's test apps answer
    any scope with a response (its TestClient never sends them a lifespan)."""

    async def declining(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)

    return declining


@pytest.fixture(params=list(SETUPS))
def setup(request: pytest.FixtureRequest) -> tuple[str, bool, bool]:
    return SETUPS[request.param]


@pytest.fixture
def in_nursery(setup: tuple[str, bool, bool]) -> bool:
    return setup[2]


@pytest.fixture
def test_client_factory(setup: tuple[str, bool, bool]) -> Iterator[TestClientFactory]:
    backend, wrapped, lifespan = setup
    with ExitStack() as clients:

        def factory(app: ASGIApp) -> TestClient:
            if wrapped:
                app = trio_bg.BackgroundTaskMiddleware(http_only(app))
            client = TestClient(app, backend=backend)  # type: ignore[arg-type]
            return clients.enter_context(client) if lifespan else client

        yield factory


def test_async_task(test_client_factory: TestClientFactory) -> None:
    TASK_COMPLETE = False

    async def async_task() -> None:
        nonlocal TASK_COMPLETE
        TASK_COMPLETE = True

    task = BackgroundTask(async_task)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = Response("task initiated", media_type="text/plain", background=task)
        await response(scope, receive, send)

    client = test_client_factory(app)
    response = client.get("/")
    assert response.text == "task initiated"
    assert TASK_COMPLETE


def test_sync_task(test_client_factory: TestClientFactory) -> None:
    TASK_COMPLETE = False

    def sync_task() -> None:
        nonlocal TASK_COMPLETE
        TASK_COMPLETE = True

    task = BackgroundTask(sync_task)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = Response("task initiated", media_type="text/plain", background=task)
        await response(scope, receive, send)

    client = test_client_factory(app)
    response = client.get("/")
    assert response.text == "task initiated"
    assert TASK_COMPLETE


def test_multiple_tasks(test_client_factory: TestClientFactory) -> None:
    TASK_COUNTER = 0

    def increment(amount: int) -> None:
        nonlocal TASK_COUNTER
        TASK_COUNTER += amount

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = BackgroundTasks()
        tasks.add_task(increment, amount=1)
        tasks.add_task(increment, amount=2)
        tasks.add_task(increment, amount=3)
        response = Response("tasks initiated", media_type="text/plain", background=tasks)  # type: ignore[arg-type]
        await response(scope, receive, send)

    client = test_client_factory(app)
    response = client.get("/")
    assert response.text == "tasks initiated"
    assert TASK_COUNTER == 1 + 2 + 3


def test_multi_tasks_failure_avoids_next_execution(
    test_client_factory: TestClientFactory, in_nursery: bool
) -> None:
    TASK_COUNTER = 0

    def increment() -> None:
        nonlocal TASK_COUNTER
        TASK_COUNTER += 1
        if TASK_COUNTER == 1:  # pragma: no branch
            raise Exception("task failed")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = BackgroundTasks()
        tasks.add_task(increment)
        tasks.add_task(increment)
        response = Response("tasks initiated", media_type="text/plain", background=tasks)  # type: ignore[arg-type]
        await response(scope, receive, send)

    client = test_client_factory(app)
    with pytest.raises(Exception):  # noqa: B017 (Starlette's)
        client.get("/")
    # trio_bg: inline (no nursery) the failure skips the next task, as in Starlette;
    # in the nursery every task runs, and the failure is raised by the client's drain.
    assert TASK_COUNTER == (2 if in_nursery else 1)  # noqa: SIM300 (not a constant)
