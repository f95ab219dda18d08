"""trio_bg.status.app: a task's status as JSON at GET /{id}, cancel by DELETE where
allowed, guarded by authorize; and the 202 pattern of the framework examples."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import asgi_client, run_lifespan

import trio_bg
import trio_bg.status
from trio_bg._web.asgi import ASGIApp, Receive, Scope, Send


async def returns(value: object) -> object:
    return value


def routed(status_app: ASGIApp, *, strip_prefix: bool) -> trio_bg.BackgroundTaskMiddleware:
    """POST /start adds a task; /tasks/... goes to ``status_app``, mounted as a server
    would (the prefix moved into root_path) or as Starlette's Mount does (kept)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].startswith("/tasks"):
            mounted = dict(scope, root_path="/tasks")
            if strip_prefix:
                mounted["path"] = scope["path"][len("/tasks") :]
            await status_app(mounted, receive, send)
            return
        value = scope["query_string"].decode()
        func = forever if value == "forever" else returns
        handle = trio_bg.current_tasks().add_task(func, value)
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": handle.id.encode()})

    return trio_bg.BackgroundTaskMiddleware(app, grace_period=0)


async def forever(value: object) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize("strip_prefix", [True, False])
async def test_get_answers_the_status_as_json_and_404_for_an_unknown_id(
    strip_prefix: bool,
) -> None:
    middleware = routed(trio_bg.status.app(public=True), strip_prefix=strip_prefix)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        task_id = (await client.post("/start?done")).text
        await middleware.nursery.wait_task(task_id)
        response = await client.get(f"/tasks/{task_id}")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert (body["id"], body["state"], body["result"]) == (task_id, "completed", "done")
        assert body["ended_at"].endswith("+00:00")
        head = await client.head(f"/tasks/{task_id}")
        assert (head.status_code, head.content) == (200, b"")
        missing = await client.get("/tasks/" + "0" * 32)
        assert missing.status_code == 404
        assert missing.json()["error"] == "no task has this id"


async def test_delete_cancels_only_where_the_app_allows_it() -> None:
    refusing = routed(trio_bg.status.app(public=True), strip_prefix=True)
    async with run_lifespan(refusing), asgi_client(refusing) as client:
        task_id = (await client.post("/start?forever")).text
        response = await client.delete(f"/tasks/{task_id}")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
    allowing = routed(trio_bg.status.app(public=True, cancel=True), strip_prefix=True)
    async with run_lifespan(allowing), asgi_client(allowing) as client:
        task_id = (await client.post("/start?forever")).text
        await trio.testing.wait_all_tasks_blocked()
        response = await client.delete(f"/tasks/{task_id}")
        assert response.json() == {"cancelled": True, "id": task_id}
        status = await allowing.nursery.wait_task(task_id)
        assert status.state == "cancelled"
        again = await client.delete(f"/tasks/{task_id}")
        assert again.json() == {"cancelled": False, "id": task_id}
        unknown = await client.delete("/tasks/" + "0" * 32)
        assert unknown.status_code == 404


async def _deny_async(scope: Scope) -> bool:
    await trio.lowlevel.checkpoint()
    return dict(scope["headers"]).get(b"authorization") == b"Bearer ok"


def _deny_sync(scope: Scope) -> bool:
    return dict(scope["headers"]).get(b"authorization") == b"Bearer ok"


@pytest.mark.parametrize("authorize", [_deny_sync, _deny_async])
async def test_authorize_guards_every_request(
    authorize: Callable[[Scope], bool | Awaitable[bool]],
) -> None:
    middleware = routed(trio_bg.status.app(authorize=authorize, cancel=True), strip_prefix=True)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        task_id = (await client.post("/start?forever")).text
        for method in ("GET", "DELETE"):
            refused = await client.request(method, f"/tasks/{task_id}")
            assert refused.status_code == 403
        allowed = await client.get(f"/tasks/{task_id}", headers={"authorization": "Bearer ok"})
        assert allowed.json()["state"] in ("pending", "running")
        status = await middleware.nursery.task_status(task_id)
        assert status is not None and status.state != "cancelled"


def test_it_refuses_to_be_made_unguarded() -> None:
    with pytest.raises(ValueError, match="authorize"):
        trio_bg.status.app()
    with pytest.raises(TypeError, match="authorize"):
        trio_bg.status.app(authorize="yes")  # type: ignore[arg-type]


# -- the examples: 202 Accepted, then the Location ------------------------------------


async def _follow_the_202(client: httpx.AsyncClient) -> dict[str, Any]:
    accepted = await client.post("/exports")
    assert accepted.status_code == 202
    location = accepted.headers["location"]
    assert location == f"/tasks/{accepted.json()['id']}"
    first = (await client.get(location)).json()
    assert first["state"] in ("pending", "running")
    await trio.sleep(0.45)  # (virtual time: the export takes 0.5 s)
    halfway = (await client.get(location)).json()
    assert (halfway["state"], halfway["message"]) == ("running", "400 of 500 rows")
    await trio.sleep(1)
    done: dict[str, Any] = (await client.get(location)).json()
    return done


@pytest.mark.parametrize("name", ["starlette_app", "fastapi_app", "quart_trio_app"])
async def test_the_examples_answer_202_with_a_location_to_the_status(
    name: str, autojump_clock: trio.testing.MockClock
) -> None:
    example = importlib.import_module(f"examples.{name}")
    async with run_lifespan(example.app), asgi_client(example.app) as client:
        done = await _follow_the_202(client)
    assert (done["state"], done["result"], done["progress"]) == ("completed", {"rows": 500}, 0.8)
