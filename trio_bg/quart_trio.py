"""Quart-Trio integration: trio_bg's nursery, grace period and report for a ``QuartTrio`` app.

::

    app = QuartTrio(__name__)
    trio_bg.quart_trio.init_app(app, grace_period=10.0)

    @app.post("/signup")
    async def signup():
        app.add_background_task(send_welcome_email, address)  # now runs through trio_bg
        return "welcome"

`init_app` wraps ``app.asgi_app`` in `BackgroundTaskMiddleware`, so the middleware
owns the lifespan: at shutdown it drains the background tasks for the grace period
(then cancels and reports them) *before* Quart's own shutdown runs (``after_serving``,
``while_serving``), and only then tells Hypercorn it is done. Quart-Trio's own
``add_background_task`` cannot do that under Hypercorn: its tasks are cancelled as
soon as the app answers ``lifespan.shutdown.complete``, whatever
``BACKGROUND_TASK_SHUTDOWN_TIMEOUT`` says.

`init_app` also makes ``app.test_app()`` a `TestApp`: Quart's test tooling, with a
shutdown timeout that covers the grace period, ``drain()``, and background
failures raised in the test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, ParamSpec, Unpack, cast

import trio
from quart import Quart, Response, has_request_context, has_websocket_context
from quart.signals import got_request_exception
from quart.testing.app import DEFAULT_TIMEOUT, LifespanError
from quart.typing import TestClientProtocol
from quart_trio import QuartTrio
from quart_trio.testing import TrioTestApp

from ._engine.calls import options_of, spec_of, task
from ._engine.status import TaskHandle
from ._errors import Overloaded
from ._running.nursery import wait_drained
from ._running.options import NurseryOptions
from ._testkit.failures import FailureWatch, WatchesTasks
from ._web.asgi import ASGIApp, Message
from ._web.collection import BackgroundTasks, collection_of, current_collection
from ._web.middleware import BackgroundTaskMiddleware, nursery_if_open
from ._web.unavailable import UNAVAILABLE_TEXT, retry_after_headers

__all__ = ["EXTENSION_KEY", "TestApp", "add_background_task", "init_app", "middleware_of"]

P = ParamSpec("P")

EXTENSION_KEY = "trio_bg"
"""The key of the `BackgroundTaskMiddleware` in ``app.extensions``."""


def init_app(
    app: QuartTrio,
    *,
    retry_after: int | None = 1,
    ordered: bool = False,
    replace_add_background_task: bool = True,
    **options: Unpack[NurseryOptions],
) -> BackgroundTaskMiddleware:
    """Give ``app`` trio_bg's background nursery; return the middleware.

    Wraps ``app.asgi_app`` in `BackgroundTaskMiddleware` (``options`` are those of
    `trio_bg.open_background_nursery`; ``ordered=True`` runs each request's tasks
    one after another), registers it as ``app.extensions["trio_bg"]``, answers
    `Overloaded` with ``503`` (``Retry-After: retry_after``), and discards the
    collected tasks of a request that ends in an unhandled exception (Quart renders
    it as a 500; the tasks must not run as if it had succeeded). With
    ``replace_add_background_task`` (the default), ``app.add_background_task``
    becomes `add_background_task`, so existing code moves to trio_bg unchanged.
    ``app.test_app()`` becomes a `TestApp` (unless the app has a test app class of
    its own). The returned middleware gives the live ``nursery`` and, after
    shutdown, the ``report``.
    """
    if not isinstance(app, QuartTrio):
        raise TypeError(f"trio_bg.quart_trio.init_app() takes a QuartTrio app, not {app!r}")
    if EXTENSION_KEY in app.extensions:
        raise RuntimeError("trio_bg.quart_trio.init_app() was already called for this app")
    # Quart types ASGI messages as hypercorn's TypedDicts; the middleware takes any mapping.
    inner = cast(ASGIApp, app.asgi_app)
    middleware = BackgroundTaskMiddleware(
        inner, retry_after=retry_after, ordered=ordered, **options
    )
    # Quart's documented way to add ASGI middleware: the app stays a QuartTrio.
    app.asgi_app = middleware  # type: ignore[method-assign, assignment]
    app.extensions[EXTENSION_KEY] = middleware
    headers = retry_after_headers(retry_after)

    async def overloaded(error: Overloaded) -> Response:
        _discard_collected("it answered 503")
        return Response(UNAVAILABLE_TEXT, status=503, headers=headers, mimetype="text/plain")

    app.register_error_handler(Overloaded, overloaded)

    async def request_failed(sender: QuartTrio, *, exception: BaseException, **_: Any) -> None:
        _discard_collected(f"it raised {exception!r}")

    got_request_exception.connect(request_failed, sender=app, weak=False)
    if replace_add_background_task:
        app.add_background_task = _method_for(app)  # type: ignore[method-assign,assignment]
    if app.test_app_class is TrioTestApp:
        # QuartTrio narrows the attribute's type to its class; Quart's is a protocol.
        app.test_app_class = TestApp  # type: ignore[assignment]
    return middleware


def middleware_of(app: QuartTrio) -> BackgroundTaskMiddleware:
    """The `BackgroundTaskMiddleware` that `init_app` installed on ``app``."""
    try:
        middleware = app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            "trio_bg is not set up for this app: call trio_bg.quart_trio.init_app(app)"
        ) from None
    if not isinstance(middleware, BackgroundTaskMiddleware):
        raise TypeError(f"app.extensions[{EXTENSION_KEY!r}] is not a BackgroundTaskMiddleware")
    return middleware


def add_background_task(func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
    """Run ``func(*args, **kwargs)`` in trio_bg's nursery: Quart-Trio's
    ``app.add_background_task``, with a grace period that waits, admission and a report.

    In an HTTP request the task runs once the response is complete (Quart-Trio
    starts it at once); in a WebSocket session, at startup or in another background
    task it starts at once, as in Quart-Trio. An ``async def`` task runs inside a
    fresh app context (``current_app``, ``g``), as Quart-Trio's do; a plain function
    runs in one of trio_bg's worker threads, where ``current_app`` still works. A
    task's exception is logged by trio_bg and passed to its ``on_error`` hook (not to
    Quart's ``got_background_exception``). Raises `trio_bg.Overloaded` when the
    nursery is full. The app is ``quart.current_app``; `init_app` also installs this
    as ``app.add_background_task``. Returns the task's `trio_bg.TaskHandle`.
    """
    from quart import current_app

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not isinstance(app, QuartTrio):
        raise TypeError(f"trio_bg.quart_trio needs a QuartTrio app, not {app!r}")
    return _add(app, func, args, kwargs)


def _method_for(app: QuartTrio) -> Callable[..., TaskHandle]:
    """`add_background_task` bound to ``app`` (to replace the app's own method)."""

    def bound(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskHandle:
        return _add(app, func, args, kwargs)

    bound.__name__ = bound.__qualname__ = "add_background_task"
    bound.__doc__ = add_background_task.__doc__
    return bound


def _add(
    app: QuartTrio, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TaskHandle:
    target = _in_app_context(app, func)
    middleware = middleware_of(app)
    tasks = current_collection.get(None)
    if tasks is not None and (
        (has_request_context() and not has_websocket_context())
        # No lifespan (Quart's test client without test_app()): no nursery to start
        # it in; the middleware runs the session's tasks inline once it ends.
        or nursery_if_open(middleware) is None
    ):
        return tasks.add_task(target, *args, **kwargs)
    return middleware.nursery.start_soon(target, *args, **kwargs)


def _in_app_context(app: QuartTrio, func: Callable[P, Any]) -> Callable[P, Any]:
    """``func``, run inside a fresh app context when it is async (like Quart-Trio's),
    unless it is a durable or a remote task.

    The wrapper keeps ``func``'s signature (``__wrapped__``), name and `trio_bg.task`
    options, so the call is checked, reported and timed out as ``func`` itself would be.
    """
    spec = spec_of(func)  # TypeError, here, for what could never run
    if not spec.is_async:
        return func  # runs in one of trio_bg's worker threads
    if spec.durable or spec.remote is not None:
        # Kept in the journal (or Redis) by name, it must stay itself; and replayed after
        # a restart (or run by a worker) it would have no app context either.
        return func

    async def in_app_context(*args: P.args, **kwargs: P.kwargs) -> Any:
        async with app.app_context():
            return await func(*args, **kwargs)  # (its result: the task's status shows it)

    in_app_context.__wrapped__ = func  # type: ignore[attr-defined]
    options = options_of(func)
    return task(
        name=spec.name,
        timeout=spec.timeout,
        retries=spec.retries,
        backoff=spec.backoff,
        key=None if options is None else options.key,
        key_ttl=None if options is None else options.key_ttl,
    )(in_app_context)


def _discard_collected(why: str) -> None:
    """Discard the tasks the current HTTP request has collected (it failed)."""
    tasks: BackgroundTasks | None = current_collection.get(None)
    if tasks is not None and has_request_context():
        from quart import request

        collection_of(tasks).discard(
            f"the {request.method} request to {request.path} failed: {why}"
        )


class TestApp(WatchesTasks):
    """What ``app.test_app()`` gives once `init_app` has run: Quart-Trio's test app
    (the app's lifespan around the block, ``test_client()``), made for trio_bg.

    - Its shutdown timeout covers the grace period: it is Quart's own 6 s (for
      ``after_serving`` and the like) plus ``grace_period``, so the shutdown drains
      the background tasks as a server would. With pytest-trio's ``autojump_clock``
      the waiting takes no real time.
    - `drain` waits until no background task is pending or running, nor collected
      by a request still in flight; then it raises what failed meanwhile (one failure
      as itself, several as `trio_bg.testing.TaskFailures`). Failures not raised yet
      are raised when the block ends, unless ``raise_task_errors`` is false;
      `task_errors` lists them all either way.
    - A failed startup raises Quart's ``LifespanError``, and a timeout
      `trio.TooSlowError`, with the lifespan cancelled cleanly.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self,
        app: Quart,
        startup_timeout: float = DEFAULT_TIMEOUT,
        shutdown_timeout: float | None = None,
        *,
        raise_task_errors: bool = True,
    ) -> None:
        """``shutdown_timeout`` defaults to Quart's 6 s plus the grace period."""
        if not isinstance(app, QuartTrio):
            raise TypeError(f"trio_bg.quart_trio.TestApp takes a QuartTrio app, not {app!r}")
        self.app = app
        self.middleware = middleware_of(app)
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = (
            DEFAULT_TIMEOUT + self.middleware.grace_period
            if shutdown_timeout is None
            else shutdown_timeout
        )
        self._failures = FailureWatch(raise_task_errors=raise_task_errors)
        self._to_app, self._app_inbox = trio.open_memory_channel[Message](math.inf)
        self._from_app, self._replies = trio.open_memory_channel[Message](math.inf)
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None

    def _watched_middleware(self) -> BackgroundTaskMiddleware:
        return self.middleware

    def test_client(self) -> TestClientProtocol:
        """The app's test client (``app.test_client()``)."""
        return self.app.test_client()

    async def drain(self) -> None:
        """Wait until no background task is pending or running, nor collected by a
        request still in flight; then raise what failed meanwhile."""
        await wait_drained(self.middleware.nursery)
        self._failures.raise_unraised()

    async def startup(self) -> None:
        """Start the app's lifespan (in `__aenter__`'s nursery)."""
        assert self._nursery is not None, "use `async with app.test_app() as test_app:`"
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self._failures.lifespan_state(),
        }
        self._nursery.start_soon(self._run_lifespan, scope)
        with trio.fail_after(self.startup_timeout):
            await self._ask("startup")

    async def shutdown(self) -> None:
        """Shut the app down: drain, cancel and report its tasks, then Quart's own."""
        with trio.fail_after(self.shutdown_timeout):
            await self._ask("shutdown")

    async def __aenter__(self) -> TestApp:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            await self.startup()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.shutdown()
        finally:
            await self._close()
        if exc_type is None:
            self._failures.raise_unraised()

    async def _run_lifespan(self, scope: dict[str, Any]) -> None:
        async with self._from_app:
            await cast(ASGIApp, self.app)(scope, self._app_inbox.receive, self._from_app.send)

    async def _ask(self, phase: str) -> None:
        await self._to_app.send({"type": f"lifespan.{phase}"})
        try:
            reply = await self._replies.receive()
        except trio.EndOfChannel:
            reply = {"type": f"lifespan.{phase}.failed", "message": "the app returned"}
        if reply["type"] != f"lifespan.{phase}.complete":
            raise LifespanError(f"Error during {phase} {reply.get('message', '')}")

    async def _close(self) -> None:
        """End the lifespan task (cancelled, as a server does once the shutdown is
        complete, or when it timed out) and the nursery it ran in."""
        assert self._nursery is not None and self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()
        try:
            await self._nursery_manager.__aexit__(None, None, None)
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # the app's own error, as it was raised
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise
