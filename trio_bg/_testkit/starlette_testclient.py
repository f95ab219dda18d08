"""`trio_bg.starlette.TestClient`: Starlette's sync test client with trio_bg's test
guarantees. A module of its own: ``starlette.testclient`` needs httpx, which an app
that only serves does not."""

from __future__ import annotations

from typing import Any, Literal, Self

from starlette.testclient import TestClient as StarletteTestClient
from starlette.types import ASGIApp

from .._running.nursery import wait_drained
from .._web.middleware import STATE_KEY, BackgroundTaskMiddleware, Message
from .failures import FailureWatch, WatchesTasks


class TestClient(WatchesTasks, StarletteTestClient):
    """Starlette's ``TestClient`` for an app with trio_bg inside: it runs the app on
    trio, and inside ``with TestClient(app) as client:`` (which runs the lifespan,
    and with it the background nursery) it waits for the background tasks and
    raises their failures in the test.

    After each request (``client.get(...)`` and the other methods) the client
    drains: it waits until no background task is pending or running, then raises
    what failed (one failure as itself, several as `trio_bg.testing.TaskFailures`),
    as Starlette's own client does with a response's inline tasks. So an assertion
    right after the request sees what its tasks did. With ``drain_after_request=False``
    only `drain` waits; failures not raised yet are raised when the block ends.
    ``raise_task_errors=False`` records them in `task_errors` instead.

    Without ``with`` no lifespan runs and the middleware has no nursery: it runs each
    request's tasks inline after the response, as Starlette does. ``backend``
    defaults to ``"trio"`` (trio_bg's nursery needs trio); the other arguments are
    Starlette's. For virtual time, pass
    ``backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)}``: the
    grace period then takes no real time (the clock jumps whenever the app is idle,
    also while the test's own code runs between requests).
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self,
        app: ASGIApp,
        base_url: str = "http://testserver",
        raise_server_exceptions: bool = True,
        root_path: str = "",
        backend: Literal["asyncio", "trio"] = "trio",
        backend_options: dict[str, Any] | None = None,
        *,
        drain_after_request: bool = True,
        raise_task_errors: bool = True,
        **kwargs: Any,
    ) -> None:
        """The arguments are Starlette's, but for the last two (see the class)."""
        super().__init__(
            app, base_url, raise_server_exceptions, root_path, backend, backend_options, **kwargs
        )
        self.drain_after_request = drain_after_request
        self._failures = FailureWatch(raise_task_errors=raise_task_errors)
        self._middleware: BackgroundTaskMiddleware | None = None
        self._startup_failure: str | None = None

    @property
    def middleware(self) -> BackgroundTaskMiddleware:
        """The app's `BackgroundTaskMiddleware` (once ``with`` has started the app)."""
        if self._middleware is None:
            raise RuntimeError(
                "no lifespan has run, so there is no background nursery: "
                "use `with TestClient(app) as client:`"
            )
        return self._middleware

    def _watched_middleware(self) -> BackgroundTaskMiddleware:
        return self.middleware

    def drain(self) -> None:
        """Wait until no background task is pending or running, nor collected by a
        request still in flight; then raise what failed meanwhile (see the class).
        Outside ``with`` the tasks ran inline, in their request: there is nothing to
        wait for."""
        if self.portal is not None and self._middleware is not None:
            self.portal.call(wait_drained, self._middleware.nursery)
        self._failures.raise_unraised()

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        """Starlette's ``request``, then `drain` (unless ``drain_after_request`` is off)."""
        response = super().request(method, url, **kwargs)
        if self.drain_after_request:
            self.drain()
        return response

    def __enter__(self) -> Self:
        self.app_state.update(self._failures.lifespan_state())
        self._middleware = None
        self._startup_failure = None
        super().__enter__()
        middleware = self.app_state.get(STATE_KEY)
        if self._startup_failure is not None or not isinstance(
            middleware, BackgroundTaskMiddleware
        ):
            super().__exit__(None, None, None)
            if self._startup_failure is not None:
                raise RuntimeError(f"lifespan.startup failed: {self._startup_failure}")
            raise TypeError(
                "trio_bg.starlette.TestClient needs an app with trio_bg's middleware inside "
                "(trio_bg.starlette.install(app), or BackgroundTaskMiddleware(app))"
            )
        self._middleware = middleware
        return self

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)  # the lifespan shutdown: drain, cancel, report
        if args[0] is None:
            self._failures.raise_unraised()

    async def wait_shutdown(self) -> None:
        if self._startup_failure is None:  # else the lifespan has ended already
            await super().wait_shutdown()

    async def lifespan(self) -> None:
        # Starlette's, noting a failed startup: its client would carry on regardless.
        async def send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                self._startup_failure = str(message.get("message", ""))
            await self.stream_send.send(message)

        scope = {"type": "lifespan", "state": self.app_state}
        try:
            await self.app(scope, self.stream_receive.receive, send)
        finally:
            await self.stream_send.send(None)
