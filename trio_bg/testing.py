"""Testing apps that use trio_bg: a client that runs the real lifespan and fails the test
when a background task fails.

Needs httpx (in trio_bg's ``test`` extra). The pytest fixtures live in
``trio_bg._pytest_plugin``, registered through the ``pytest11`` entry point.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from ._running.nursery import wait_drained
from ._testkit.failures import FailureWatch, TaskFailures, WatchesTasks
from ._web.middleware import STATE_KEY, ASGIApp, BackgroundTaskMiddleware, Message

__all__ = ["TaskFailures", "TestClient", "open_test_client"]


class TestClient(WatchesTasks, httpx.AsyncClient):
    """An `httpx.AsyncClient` that calls an app wrapped in `BackgroundTaskMiddleware`
    in-process, with the app's real lifespan and background nursery.

    Open it with `open_test_client`. A background task that fails is raised again
    at the next `drain` or when the client closes, unless ``raise_task_errors`` was
    false; `task_errors` lists every failure either way.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self,
        app: ASGIApp,
        middleware: BackgroundTaskMiddleware,
        failures: FailureWatch,
        **kwargs: Any,
    ) -> None:
        """Private: use `open_test_client`."""
        super().__init__(transport=httpx.ASGITransport(app=app), **kwargs)
        self.middleware = middleware
        self._failures = failures

    def _watched_middleware(self) -> BackgroundTaskMiddleware:
        return self.middleware

    async def drain(self) -> None:
        """Wait until no background task is pending or running, nor collected by a
        request still in flight; then raise what failed meanwhile (see the class)."""
        await wait_drained(self.middleware.nursery)
        self._failures.raise_unraised()


@asynccontextmanager
async def open_test_client(
    app: ASGIApp,
    *,
    base_url: str = "http://testserver",
    raise_task_errors: bool = True,
    **client_options: Any,
) -> AsyncIterator[TestClient]:
    """Start ``app``'s lifespan, yield a `TestClient` for it, then shut it down.

    ``app`` is a `BackgroundTaskMiddleware` or any ASGI app with one inside (found
    through the lifespan state). Leaving the block runs the lifespan shutdown, so
    the grace period applies (use pytest-trio's ``autojump_clock`` to skip waiting),
    and then raises any background failure not raised yet. Extra keyword arguments
    go to `httpx.AsyncClient`.
    """
    failures = FailureWatch(raise_task_errors=raise_task_errors)
    state = failures.lifespan_state()
    to_app, app_inbox = trio.open_memory_channel[Message](math.inf)
    from_app, replies = trio.open_memory_channel[Message](math.inf)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}

    async def ask(kind: str) -> None:
        await to_app.send({"type": f"lifespan.{kind}"})
        try:
            reply = await replies.receive()
        except trio.EndOfChannel:
            # BackgroundTaskMiddleware always answers: this app has none.
            raise TypeError(
                f"the app ended its lifespan without answering lifespan.{kind}: "
                f"open_test_client() needs an app wrapped in trio_bg.BackgroundTaskMiddleware"
            ) from None
        if reply["type"] != f"lifespan.{kind}.complete":
            raise RuntimeError(f"lifespan.{kind} failed: {reply.get('message', '')!r}")

    async def run_lifespan() -> None:
        async with from_app:
            await app(scope, app_inbox.receive, from_app.send)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_lifespan)
            await ask("startup")
            middleware = state.get(STATE_KEY)
            if not isinstance(middleware, BackgroundTaskMiddleware):
                raise TypeError(
                    "open_test_client() needs an app wrapped in trio_bg.BackgroundTaskMiddleware"
                )
            client = TestClient(
                app,
                middleware,
                failures,
                base_url=base_url,
                **client_options,
            )
            async with client:
                yield client
            await ask("shutdown")
            nursery.cancel_scope.cancel()  # as a server does once shutdown is complete
    except BaseExceptionGroup as group:
        # The lifespan task does not fail on its own: one error is the test's (or the
        # start-up's); give it back as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
    failures.raise_unraised()
