"""Starlette integration: install the middleware inside the app's stack, answer
`Overloaded` with a 503.

Starlette runs on trio through AnyIO (serve it with Hypercorn's trio worker)::

    app = Starlette(routes=...)
    trio_bg.starlette.install(app, grace_period=10.0)

    async def signup(request):
        trio_bg.current_tasks().add_task(send_welcome_email, address)
        return PlainTextResponse("welcome")

A `trio_bg.BackgroundTasks` is also a valid ``background`` of a Starlette
``Response``: Starlette calls it after the body was sent, and it hands its tasks
to the server's nursery instead of running them inline.

`TestClient` is Starlette's sync test client on trio, waiting for the background
tasks after each request and raising their failures in the test (it needs httpx,
as Starlette's does).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Unpack

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ._errors import Overloaded
from ._running.options import NurseryOptions, Settings
from ._web.collection import BackgroundTasks, collection_of
from ._web.middleware import SCOPE_KEY, BackgroundTaskMiddleware
from ._web.unavailable import UNAVAILABLE_TEXT, check_retry_after, retry_after_headers

if TYPE_CHECKING:
    from ._testkit.starlette_testclient import TestClient

__all__ = ["TestClient", "install", "middleware_of", "overloaded_handler"]


def __getattr__(name: str) -> object:
    # TestClient is imported on first use: starlette.testclient needs httpx, which
    # an app that only serves does not.
    if name == "TestClient":
        from ._testkit.starlette_testclient import TestClient

        return TestClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


OverloadedHandler = Callable[[Request, Exception], Awaitable[Response]]
"""The type of `overloaded_handler`: a Starlette HTTP exception handler."""


def install(
    app: Starlette,
    *,
    retry_after: int | None = 1,
    ordered: bool = False,
    **options: Unpack[NurseryOptions],
) -> None:
    """Add `BackgroundTaskMiddleware` to ``app`` (a Starlette or FastAPI app) and a
    handler that answers `Overloaded` with ``503 Service Unavailable``.

    Call it before the app serves its first request. The middleware goes into the
    app's own stack (``app.add_middleware``), inside Starlette's
    ``ServerErrorMiddleware``: it still receives the lifespan, and an endpoint's
    unhandled exception reaches it before Starlette turns it into a 500 page, so the
    tasks of that request are discarded rather than run. ``retry_after`` (seconds,
    None for no header) is the 503's ``Retry-After``; ``ordered=True`` runs each
    request's tasks one after another, in the order added (as Starlette does, but
    after the response, in the nursery); the other options are those of
    `trio_bg.open_background_nursery`.
    """
    Settings.from_options(options)  # a bad option fails here, not at server start
    handler = _overloaded_handler(retry_after)  # checks retry_after
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be True or False, not {ordered!r}")
    app.add_middleware(
        BackgroundTaskMiddleware, retry_after=retry_after, ordered=ordered, **options
    )
    app.add_exception_handler(Overloaded, handler)


def _overloaded_handler(retry_after: int | None) -> OverloadedHandler:
    check_retry_after(retry_after)
    headers = retry_after_headers(retry_after)

    async def handle_overloaded(request: Request, exc: Exception) -> Response:
        tasks = request.scope.get(SCOPE_KEY)
        if isinstance(tasks, BackgroundTasks):
            # The client is told to retry: the work this request collected must not
            # run now as well.
            why = f"the {request.method} request to {request.url.path} answered 503"
            collection_of(tasks).discard(why)
        return PlainTextResponse(UNAVAILABLE_TEXT, status_code=503, headers=headers)

    handle_overloaded.__qualname__ = handle_overloaded.__name__ = "overloaded_handler"
    handle_overloaded.__doc__ = (
        "A Starlette exception handler for trio_bg.Overloaded: 503 Service Unavailable"
        + ("" if retry_after is None else f" with Retry-After: {retry_after}")
        + ", the tasks the request had collected discarded."
    )
    return handle_overloaded


overloaded_handler: OverloadedHandler = _overloaded_handler(retry_after=1)
"""A Starlette exception handler for `trio_bg.Overloaded`: ``503 Service Unavailable``
with ``Retry-After: 1``, the tasks the request had collected discarded.

`install` registers it; to compose an app by hand, pass
``exception_handlers={trio_bg.Overloaded: trio_bg.starlette.overloaded_handler}``.
Without it, an `Overloaded` escaping an endpoint reaches Starlette's
``ServerErrorMiddleware`` (a 500) before a `BackgroundTaskMiddleware` that wraps the
whole app could answer 503.
"""


def middleware_of(app: Starlette) -> BackgroundTaskMiddleware:
    """The `BackgroundTaskMiddleware` in ``app``'s middleware stack (for its ``nursery``
    and, after shutdown, its ``report``). Starlette builds the stack when the app
    first runs, so call this from a handler, the lifespan, or after the app served."""
    layer: object = app.middleware_stack
    while layer is not None:
        if isinstance(layer, BackgroundTaskMiddleware):
            return layer
        layer = getattr(layer, "app", None)
    raise RuntimeError(
        "no BackgroundTaskMiddleware in this app's middleware stack (call "
        "trio_bg.starlette.install(app) before the app first runs)"
    )
