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

FastAPI's meaning is kept: ``add_task`` is FastAPI's own method (a test's
``patch("fastapi.BackgroundTasks.add_task")`` sees every call), and a request whose
request-scoped dependencies with ``yield`` are still open (a database session, say)
keeps them open until its tasks have ended, as FastAPI does, its tasks one after
another (see `install`).

`TestClient` is `trio_bg.starlette.TestClient` (FastAPI's ``TestClient`` is Starlette's):
on trio, and inside ``with``, waiting for the background tasks after each request.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Annotated, Any, Unpack

import fastapi
import fastapi.routing
import starlette.routing
from fastapi import Depends
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection
from starlette.types import Scope

from ._engine import tasks as _tasks
from ._running.options import NurseryOptions
from ._web import collection as _collection
from .starlette import install as _install_middleware
from .starlette import middleware_of, overloaded_handler

if TYPE_CHECKING:
    from ._testkit.starlette_testclient import TestClient

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
        from ._testkit.starlette_testclient import TestClient

        return TestClient
    if name == "BackgroundTasks":
        raise ImportError(
            "trio_bg.fastapi has no BackgroundTasks: keep FastAPI's own (from fastapi "
            "import BackgroundTasks); once trio_bg.fastapi.install(app) ran, its tasks run "
            "in trio_bg's nursery. For trio_bg's collection itself, declare tasks: "
            "trio_bg.fastapi.Tasks (or use trio_bg.BackgroundTasks)"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install(
    app: fastapi.FastAPI,
    *,
    retry_after: int | None = 1,
    ordered: bool | None = None,
    keep_dependencies_open: bool = True,
    **options: Unpack[NurseryOptions],
) -> None:
    """Run the background tasks of ``app`` in trio_bg's nursery: adopt FastAPI's own
    ``BackgroundTasks`` (`adopt_background_tasks`), add `BackgroundTaskMiddleware`, and
    answer `Overloaded` with ``503 Service Unavailable`` (`trio_bg.starlette.install`).

    Call it before adding routes or including routers (`RuntimeError` otherwise).
    ``keep_dependencies_open`` and ``ordered`` are as in `adopt_background_tasks`
    (``ordered=True`` also orders the tasks added through `Tasks`); the other options
    are those of `trio_bg.starlette.install`.
    """
    adopt_background_tasks(app, ordered=ordered, keep_dependencies_open=keep_dependencies_open)
    _install_middleware(app, retry_after=retry_after, ordered=ordered is True, **options)


def adopt_background_tasks(
    app: fastapi.FastAPI, *, ordered: bool | None = None, keep_dependencies_open: bool = True
) -> None:
    """Make every ``fastapi.BackgroundTasks`` that ``app`` injects pass its tasks to
    the request's `trio_bg.BackgroundTasks` (`install` does this for you).

    ``keep_dependencies_open``: as FastAPI does, a request whose request-scoped
    dependencies with ``yield`` (``Depends(get_db)``) are open when it adds tasks
    keeps them open until those tasks have ended (the tasks may use what they
    yielded): its ASGI call returns then, not once the response was sent. Only such
    requests are held, and while held they count toward the server's graceful
    shutdown timeout (Hypercorn's ``graceful_timeout``: past it, the request is
    cancelled and its dependencies exit while its tasks run on). False frees every
    request at once: for apps whose tasks open their own resources.

    ``ordered``: None (the default) runs the tasks of such a held request one after
    another, as FastAPI does (two tasks sharing one database session at once would
    break it), and other requests' tasks concurrently; True runs every request's
    tasks in order; False runs them concurrently, held or not.

    Use it alone when the middleware comes another way: an app wrapped in
    `BackgroundTaskMiddleware`, or a FastAPI app mounted in an installed one (served
    with no middleware at all, FastAPI's tasks run as FastAPI runs them). It adds an
    app-level dependency, which FastAPI applies to the routes and routers added after
    it; so it refuses, with `RuntimeError`, an app that has some already.
    """
    if not isinstance(keep_dependencies_open, bool):
        raise TypeError(
            f"keep_dependencies_open must be True or False, not {keep_dependencies_open!r}"
        )
    if ordered is not None and not isinstance(ordered, bool):
        raise TypeError(f"ordered must be None, True or False, not {ordered!r}")
    if any(
        isinstance(getattr(depends.dependency, "__self__", None), _Adoption)
        for depends in app.router.dependencies
    ):
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
    adoption = _Adoption(keep_open=keep_dependencies_open, order_held=ordered is None)
    app.router.dependencies.insert(0, Depends(adoption.adopt))


class _Adoption:
    """The dependency `adopt_background_tasks` adds (first of all: FastAPI solves them
    in order, and makes the request's one ``BackgroundTasks`` for the first that asks):
    FastAPI gives the endpoint and every dependency the same ``BackgroundTasks``, and
    this makes its tasks pass to the request's `trio_bg.BackgroundTasks`."""

    def __init__(self, *, keep_open: bool, order_held: bool) -> None:
        self.keep_open = keep_open
        self.order_held = order_held

    # A method, not __call__: FastAPI reads a dependency's annotations with the help of
    # its __globals__, which a bound method has and an instance does not.
    async def adopt(
        self, background_tasks: fastapi.BackgroundTasks, connection: HTTPConnection
    ) -> None:
        tasks = _collection.current_collection.get(None)
        if tasks is None:  # no middleware: FastAPI runs them inline, as trio_bg would
            return
        collection = _collection.collection_of(tasks)
        adopted = _Adopted(self, background_tasks, collection, connection.scope)
        adopted.take()  # those added by a dependency solved before this one
        # (trio_bg's add_task takes ``func`` by position only: nobody passes it by name)
        background_tasks.add_task = adopted.add_task  # type: ignore[method-assign,assignment]


class _Adopted:
    """One request's ``fastapi.BackgroundTasks``, adopted: what its ``add_task`` adds
    passes to the request's `trio_bg.BackgroundTasks`."""

    __slots__ = ("_adoption", "_ends", "_fastapi", "_hold", "_request", "_scope")

    def __init__(
        self,
        adoption: _Adoption,
        fastapi_tasks: fastapi.BackgroundTasks,
        collection: _collection.RequestTasks,
        scope: Scope,
    ) -> None:
        self._adoption = adoption
        self._fastapi = fastapi_tasks
        self._request = collection  # the request's, behind its trio_bg.BackgroundTasks
        self._scope = scope
        self._ends: _tasks.TaskEnds | None = None  # made with the first task, to hold
        self._hold: BackgroundTask | None = None

    def add_task(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """FastAPI's own ``add_task`` (found on the class, as a call on a plain instance
        finds it: a test's patch of ``fastapi.BackgroundTasks.add_task`` sees the call,
        as without trio_bg), then the task passes to trio_bg, checked there and then."""
        _method_of_class(self._fastapi, "add_task")(func, *args, **kwargs)
        self.take()

    def take(self) -> None:
        """Pass the tasks FastAPI collected to trio_bg's collection. Where request-scoped
        dependencies wait to exit, FastAPI keeps one task in their place, which holds
        the request until they have ended (`_hold_open`)."""
        collected = self._fastapi.tasks
        added = [task for task in collected if task is not self._hold]
        if not added:
            return
        if self._adoption.keep_open and self._ends is None:
            self._ends = _tasks.TaskEnds()
        if self._ends is not None and self._hold is None and _exits_waiting(self._scope):
            self._hold = BackgroundTask(self._hold_open)
            if self._adoption.order_held:
                self._request.ordered = True  # they may share what the dependencies yielded
        collected[:] = [] if self._hold is None else [self._hold]
        for task in added:
            if self._ends is None:
                self._request.take(_tasks.Task(task.func, task.args, task.kwargs))
            else:
                self._request.add_counted(self._ends, task.func, task.args, task.kwargs)

    async def _hold_open(self) -> None:
        """Run by Starlette after the response's body, inside FastAPI's request-scoped
        dependencies (some wait to exit): return once the tasks have ended."""
        assert self._ends is not None
        await self._request.until_ended(self._ends)


def _exits_waiting(scope: Scope) -> bool:
    """Whether FastAPI's request-scoped dependencies with ``yield`` of the request of
    ``scope`` have code waiting to run at its end."""
    stack = scope.get("fastapi_inner_astack")
    if not isinstance(stack, AsyncExitStack):
        return False
    # contextlib has no public way to ask; where its private list is gone, assume so.
    return bool(getattr(stack, "_exit_callbacks", True))


def _method_of_class(instance: object, name: str) -> Callable[..., Any]:
    """``instance``'s attribute ``name`` as found on its class, ignoring the instance's
    own: bound if it is a function (or any descriptor), as is (a mock) otherwise."""
    attribute = getattr(type(instance), name)
    bind = getattr(type(attribute), "__get__", None)
    bound: Callable[..., Any] = (
        attribute if bind is None else bind(attribute, instance, type(instance))
    )
    return bound


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


async def request_tasks() -> _collection.BackgroundTasks:
    """FastAPI dependency: the `trio_bg.BackgroundTasks` of the request being handled.

    An ``async def`` on purpose: FastAPI would run a plain function dependency (such
    as `trio_bg.current_tasks` itself) in a worker thread, one per request.
    """
    return _collection.current_tasks()


Tasks = Annotated[_collection.BackgroundTasks, Depends(request_tasks)]
"""Declare ``tasks: Tasks`` in an endpoint (or a dependency) to get the request's
`trio_bg.BackgroundTasks`; its tasks run in the server's nursery after the response."""
