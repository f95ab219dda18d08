"""FastAPI integration: FastAPI's own ``BackgroundTasks`` run in trio_bg's nursery.

FastAPI runs on trio through AnyIO (serve it with Hypercorn's trio worker)::

    app = FastAPI()
    trio_bg.fastapi.install(app, grace_period=10.0)  # before the routes

    @app.post("/signup")
    async def signup(address: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_welcome_email, address)  # FastAPI code, unchanged
        return {"status": "welcome"}

Once `install` ran, a ``fastapi.BackgroundTasks`` parameter, of an endpoint or of a
dependency, passes every task to the request's `trio_bg.BackgroundTasks`: the call is
checked at once, and the task runs in the server's nursery after the response.
``tasks: Tasks`` gets the request's `trio_bg.BackgroundTasks` itself.

`TestClient` is `trio_bg.starlette.TestClient` (FastAPI's ``TestClient`` is Starlette's):
on trio, and inside ``with``, waiting for the background tasks after each request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Unpack

import fastapi
import fastapi.routing
import starlette.routing
from fastapi import Depends

from . import _tasks
from ._options import NurseryOptions
from .starlette import install as _install_middleware
from .starlette import middleware_of, overloaded_handler

if TYPE_CHECKING:
    from ._starlette_testclient import TestClient

__all__ = [
    "Tasks",
    "TestClient",
    "adopt_background_tasks",
    "install",
    "middleware_of",
    "overloaded_handler",
    "request_tasks",
]


def __getattr__(name: str) -> object:
    if name == "TestClient":  # imported on first use: it needs httpx
        from ._starlette_testclient import TestClient

        return TestClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install(
    app: fastapi.FastAPI,
    *,
    retry_after: int | None = 1,
    ordered: bool = False,
    **options: Unpack[NurseryOptions],
) -> None:
    """Run the background tasks of ``app`` in trio_bg's nursery: adopt FastAPI's own
    ``BackgroundTasks`` (`adopt_background_tasks`), add `BackgroundTaskMiddleware`, and
    answer `Overloaded` with ``503 Service Unavailable`` (`trio_bg.starlette.install`).

    Call it before adding routes or including routers (`RuntimeError` otherwise).
    ``ordered=True`` runs each request's tasks one after another, in the order they
    were added, as FastAPI does; still in the nursery, after the response. The other
    options are those of `trio_bg.starlette.install`.
    """
    adopt_background_tasks(app)
    _install_middleware(app, retry_after=retry_after, ordered=ordered, **options)


def adopt_background_tasks(app: fastapi.FastAPI) -> None:
    """Make every ``fastapi.BackgroundTasks`` that ``app`` injects pass its tasks to
    the request's `trio_bg.BackgroundTasks` (`install` does this for you).

    Use it alone when the middleware comes another way: an app wrapped in
    `BackgroundTaskMiddleware`, or a FastAPI app mounted in an installed one (served
    with no middleware at all, FastAPI's tasks run as FastAPI runs them). It adds an
    app-level dependency, which FastAPI applies to the routes and routers added after
    it; so it refuses, with `RuntimeError`, an app that has some already.
    """
    if any(depends.dependency is _adopt for depends in app.router.dependencies):
        return
    if early := [route for route in app.router.routes if _may_inject(route)]:
        paths = ", ".join(getattr(route, "path", None) or "an included router" for route in early)
        raise RuntimeError(
            "trio_bg.fastapi.install(app) (or adopt_background_tasks) must come before the "
            "app's routes: FastAPI applies an app-level dependency only to the routes and "
            f"routers added after it. Call it right after app = FastAPI(...); already added: "
            f"{paths}"
        )
    # First of all dependencies: FastAPI solves them in order, and creates the
    # request's one BackgroundTasks for the first that asks for it.
    app.router.dependencies.insert(0, Depends(_adopt))


async def _adopt(background_tasks: fastapi.BackgroundTasks) -> None:
    """The dependency `adopt_background_tasks` adds: redirect this request's
    ``BackgroundTasks`` (FastAPI gives the endpoint and every dependency the same one)."""
    tasks = _tasks._current_tasks.get(None)
    if tasks is None:  # no middleware: FastAPI runs them inline, as trio_bg would
        return
    for task in background_tasks.tasks:  # added by a dependency solved before this one
        tasks.add_task(task.func, *task.args, **task.kwargs)
    background_tasks.tasks.clear()  # FastAPI would run them inline, after the body
    # (trio_bg's add_task takes ``func`` by position only: nobody passes it by name)
    background_tasks.add_task = tasks.add_task  # type: ignore[method-assign,assignment]


def _may_inject(route: starlette.routing.BaseRoute) -> bool:
    """Whether ``route`` may inject a ``fastapi.BackgroundTasks``: a FastAPI route, or a
    router FastAPI included (Starlette's own routes cannot)."""
    fastapi_routes = fastapi.routing.APIRoute | fastapi.routing.APIWebSocketRoute
    starlette_routes = (
        starlette.routing.Route
        | starlette.routing.WebSocketRoute
        | starlette.routing.Mount
        | starlette.routing.Host
    )
    return isinstance(route, fastapi_routes) or not isinstance(route, starlette_routes)


async def request_tasks() -> _tasks.BackgroundTasks:
    """FastAPI dependency: the `trio_bg.BackgroundTasks` of the request being handled.

    An ``async def`` on purpose: FastAPI would run a plain function dependency (such
    as `trio_bg.current_tasks` itself) in a worker thread, one per request.
    """
    return _tasks.current_tasks()


Tasks = Annotated[_tasks.BackgroundTasks, Depends(request_tasks)]
"""Declare ``tasks: Tasks`` in an endpoint (or a dependency) to get the request's
`trio_bg.BackgroundTasks`; its tasks run in the server's nursery after the response."""
