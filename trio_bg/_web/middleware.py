"""BackgroundTaskMiddleware: the lifespan owns the nursery; each request collects tasks
and hands them over once its response is complete."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Unpack

import trio

from .._engine.report import ShutdownReport
from .._errors import HandoffError, JournalError, Overloaded
from .._running.nursery import BackgroundNursery, fatal, open_nursery, stopping, watch_failures
from .._running.options import NurseryOptions, Settings
from .asgi import ASGIApp, Message, Receive, Scope, Send, describe, expect
from .client_watch import ClientWatch
from .collection import BackgroundTasks, RequestTasks, TaskSink, current_collection, face_of
from .hypercorn_worker import hypercorn_worker_config, ignore_sigterm
from .inline import InlineSink, on_trio
from .lifespan import NOT_TRIO, WrappedLifespan, show_report
from .unavailable import (
    HANDOFF_FAILED_TEXT,
    HANDOFF_IN_DOUBT_TEXT,
    JOURNAL_FAILED_TEXT,
    UNAVAILABLE_TEXT,
    check_retry_after,
    unavailable_response,
)

__all__ = ["ASGIApp", "BackgroundTaskMiddleware", "Message", "Receive", "Scope", "Send"]

SCOPE_KEY = "trio_bg.tasks"
"""The request scope key under which the middleware puts the `BackgroundTasks`."""

STATE_KEY = "trio_bg.middleware"
"""The lifespan state key under which the middleware publishes itself at startup."""

FAILURE_WATCHERS_KEY = "trio_bg.failure_watchers"
"""Private: a list of ``watcher(name, exc)`` in the lifespan state, attached to the
nursery before the app's own startup runs (how trio_bg.testing sees every failure)."""

logger = logging.getLogger("trio_bg")


class BackgroundTaskMiddleware:
    """ASGI middleware that runs each request's background tasks after its response.

    It speaks the lifespan protocol itself: on startup it opens a `BackgroundNursery`
    (then starts the wrapped app's own lifespan, if it has one); on shutdown it drains
    and cancels the background tasks first, then shuts the wrapped app down, and only
    then tells the server it is done. Each HTTP request and WebSocket session gets a
    fresh `BackgroundTasks` (`current_tasks()`, or ``scope["trio_bg.tasks"]``), whose
    tasks go to the nursery once the final response message was handed to the server,
    or the WebSocket session ended. Tasks of a request whose response never completed
    are discarded, counted and logged. When `Overloaded` escapes the app before its
    response started, the middleware answers ``503 Service Unavailable``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        retry_after: int | None = 1,
        ordered: bool = False,
        stop_on_failure: bool = False,
        **options: Unpack[NurseryOptions],
    ) -> None:
        """Wrap ``app``. ``retry_after`` is the ``Retry-After`` (seconds) of the 503
        answer when `Overloaded` escapes the app (None: no header); ``ordered`` makes
        each request's tasks run one after another (`BackgroundTasks.ordered`), and
        ``stop_on_failure`` skips the rest after a failure, as Starlette does
        (`BackgroundTasks.stop_on_failure`); the other options are those of
        `open_background_nursery`."""
        if not callable(app):
            raise TypeError(f"BackgroundTaskMiddleware wraps an ASGI app, not {app!r}")
        check_retry_after(retry_after)
        for name, flag in (("ordered", ordered), ("stop_on_failure", stop_on_failure)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, not {flag!r}")
        self._ordered = ordered
        self._stop_on_failure = stop_on_failure
        self._settings = Settings.from_options(options)  # fails here, not at server start
        self.app = app
        self._unavailable = unavailable_response(retry_after, UNAVAILABLE_TEXT)
        self._journal_failed = unavailable_response(retry_after, JOURNAL_FAILED_TEXT)
        self._handoff_failed = unavailable_response(retry_after, HANDOFF_FAILED_TEXT)
        self._handoff_in_doubt = unavailable_response(retry_after, HANDOFF_IN_DOUBT_TEXT)
        self._nursery: BackgroundNursery | None = None
        self._report: ShutdownReport | None = None
        # What went wrong in the lifespan, for trio_bg.serve: the wrapped app's failed
        # startup or shutdown, or a nursery that could not start; and how to stop the
        # server when a task raises KeyboardInterrupt or SystemExit (None: raise it from
        # the lifespan).
        self._lifespan_failure: str | None = None
        self._stop_server: Callable[[], object] | None = None
        self._warned_inline = False

    @property
    def nursery(self) -> BackgroundNursery:
        """The `BackgroundNursery` of the lifespan (`RuntimeError` before it started;
        after shutdown it stays, closed, for its final `BackgroundNursery.stats`)."""
        if self._nursery is None:
            raise RuntimeError(
                "BackgroundTaskMiddleware has no nursery: the server has not sent "
                "lifespan.startup. Serve the app with Hypercorn, or run its lifespan in "
                "tests (trio_bg.testing.open_test_client; httpx.ASGITransport alone does not)."
            )
        return self._nursery

    @property
    def grace_period(self) -> float:
        """Seconds the shutdown waits for the background tasks before cancelling them."""
        return self._settings.grace_period

    @property
    def report(self) -> ShutdownReport:
        """The `ShutdownReport` of the last lifespan shutdown (`RuntimeError` before)."""
        if self._report is None:
            raise RuntimeError("BackgroundTaskMiddleware has not shut down yet")
        return self._report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- requests ------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        collection, tasks, inline = self._collection()
        client = ClientWatch(receive, listening=inline is None)
        response_started = trailers = False
        # With a journal or a streaq worker, the response's start waits for its first
        # body: should the durable tasks fail to be stored (the remote ones to be handed
        # off), a single-body response can still be a 503.
        hold_start = self._settings.journal is not None or self._settings.streaq is not None
        held_start: Message | None = None
        replaced = False  # by the 503: what the app sends after it goes nowhere

        def complete(client_gone: bool) -> None:
            if client_gone:  # the server dropped the response's last messages
                collection.discard(
                    f"{describe(scope)} lost its client before its response completed"
                )
            else:
                collection.hand_off()

        async def send_then_hand_off(message: Message) -> None:
            nonlocal response_started, trailers, held_start, replaced
            if replaced:
                return
            kind = message["type"]
            if kind == "http.response.body":
                more_body = message.get("more_body", False)
                if more_body:  # streaming: the client may leave before the end
                    client.listen()
                final = not (trailers or more_body)
            elif kind == "http.response.start":
                response_started = True
                trailers = bool(message.get("trailers", False))
                if hold_start:
                    held_start = message
                    return
                final = False
            else:
                final = _completes_response(kind, message)
            if collection.uncommitted and (final or kind == "http.response.body"):
                # The durability point: the tasks are in the journal (or Redis) before
                # any of the body goes out (a client may have it all before the final
                # message: a content-length body, then an empty final one, as Quart
                # sends it), and those added meanwhile before the final one.
                try:
                    await collection.commit()
                except (JournalError, HandoffError) as error:
                    collection.discard(f"{describe(scope)} failed to keep them: {error}")
                    if held_start is None:
                        raise  # streaming already: abort the response
                    held_start, replaced = None, True
                    if isinstance(error, JournalError):
                        failed = self._journal_failed
                    else:
                        failed = self._handoff_in_doubt if error.in_doubt else self._handoff_failed
                    await send(failed[0])
                    await send(failed[1])
                    return
            if held_start is not None:
                start, held_start = held_start, None
                await send(start)
            if not final:
                await send(message)
                return
            # Whether the client had left before the final message: a disconnect that
            # comes while (or after) the server sends it ends a complete response.
            client_gone = client.gone
            try:
                await send(message)
            except trio.Cancelled:
                # Some frameworks (Quart-Trio) cancel their own request after the final
                # bytes were handed over: the response is complete all the same.
                complete(client_gone)
                raise
            complete(client_gone)

        token = current_collection.set(tasks)
        try:
            await self.app({**scope, SCOPE_KEY: tasks}, client.receive, send_then_hand_off)
        except BaseException as exc:
            if response_started or not _is_overload(exc):
                self._discard_on_error(scope, collection, exc)
                raise
            collection.discard(f"{describe(scope)} answered 503: background task capacity is full")
            await send(self._unavailable[0])
            await send(self._unavailable[1])
            return
        finally:
            current_collection.reset(token)
            client.close()
        if held_start is not None:  # a start with no body: as the app sent it
            await send(held_start)
        if not collection.settled:  # (marks it: a straggler's add_task is discarded too)
            collection.discard(f"{describe(scope)} returned without completing its response")
        if inline is not None:
            await inline.run()

    def _collection(self) -> tuple[RequestTasks, BackgroundTasks, InlineSink | None]:
        """A new request's tasks, and the `BackgroundTasks` the app sees of them; and,
        with no nursery, the sink that runs them inline."""
        sink: TaskSink | None = self._nursery
        inline = None
        if sink is None:
            sink = inline = self._inline_sink()
        collection = RequestTasks(
            sink, ordered=self._ordered, stop_on_failure=self._stop_on_failure
        )
        return collection, face_of(collection), inline

    def _inline_sink(self) -> InlineSink:
        """Where a request's tasks go when no lifespan ever started: they run inline,
        after the response, in the request's own call, as Starlette's would."""
        if not self._warned_inline:
            self._warned_inline = True
            logger.warning(
                "no ASGI lifespan started%s, so BackgroundTaskMiddleware has no nursery: "
                "background tasks run inline after each response, one after another, as "
                "Starlette's do. Servers run the lifespan (hypercorn --worker-class trio, "
                "trio_bg.serve); in tests, `with trio_bg.starlette.TestClient(app)`, "
                "Quart's `async with app.test_app()`, or trio_bg.testing.open_test_client",
                "" if on_trio() else " and this is not trio",
            )
        return InlineSink()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        collection, tasks, inline = self._collection()
        token = current_collection.set(tasks)
        try:
            await self.app({**scope, SCOPE_KEY: tasks}, receive, send)
        except BaseException as exc:
            self._discard_on_error(scope, collection, exc)
            raise
        finally:
            current_collection.reset(token)
        if collection.uncommitted:
            try:
                await collection.commit()
            except (JournalError, HandoffError) as error:
                collection.discard(f"{describe(scope)} failed to keep them: {error}")
                return
        collection.hand_off()  # the session ended without an error
        if inline is not None:
            await inline.run()

    def _discard_on_error(self, scope: Scope, collection: RequestTasks, exc: BaseException) -> None:
        if not collection.settled:
            what = "was cancelled" if isinstance(exc, trio.Cancelled) else f"raised {exc!r}"
            collection.discard(f"{describe(scope)} {what} before its response completed")

    # -- lifespan ------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await expect(receive, "lifespan.startup")
        if not on_trio():
            await send({"type": "lifespan.startup.failed", "message": NOT_TRIO})
            raise RuntimeError(NOT_TRIO)  # as Starlette's router does: test clients expect it
        if self._nursery is not None and not self._nursery.closed:
            raise RuntimeError("this BackgroundTaskMiddleware is already running a lifespan")
        async with trio.open_nursery() as app_nursery:
            if (worker_config := hypercorn_worker_config()) is not None:
                await app_nursery.start(ignore_sigterm, worker_config, self.grace_period)
            app = WrappedLifespan(self.app, scope)
            app_nursery.start_soon(app.run)
            try:
                last_message = await self._run_lifespan(scope, app, receive, send)
            finally:
                app_nursery.cancel_scope.cancel()
        raised = None if self._nursery is None else fatal(self._nursery)
        if raised is not None and self._stop_server is None:
            # A task's KeyboardInterrupt or SystemExit, after the drain and the app's
            # shutdown: it stops the server (and the process) as trio means it to.
            raise raised
        if self._report is not None and last_message["type"].startswith("lifespan.shutdown"):
            show_report(self._report)
        # Hypercorn cancels this task as soon as it has this message: everything is done.
        await send(last_message)
        if last_message["type"] == "lifespan.startup.failed":
            # After a failed startup the lifespan raises, as Starlette's router does:
            # test clients wait for that (Hypercorn's send has raised already).
            raise RuntimeError(f"the app's lifespan startup failed: {last_message['message']}")

    async def _run_lifespan(
        self, scope: Scope, app: WrappedLifespan, receive: Receive, send: Send
    ) -> Message:
        """Run the lifespan up to its last message, and return that message."""
        opened: BackgroundNursery | None = None
        try:
            async with open_nursery(self._settings, raise_fatal=False) as nursery:
                self._nursery = opened = nursery
                if isinstance(state := scope.get("state"), dict):
                    # Found here by trio_bg.testing, and by the app's own requests (the
                    # server copies the lifespan state into each request's scope).
                    state[STATE_KEY] = self
                    watch_failures(nursery, state.get(FAILURE_WATCHERS_KEY, ()))
                failure = await app.startup()
                if failure is None:
                    await send({"type": "lifespan.startup.complete"})
                    await self._until_shutdown(receive, nursery)
                # The tasks may use what the app's own shutdown closes: drain them first.
                await nursery.shutdown()
        except (JournalError, HandoffError) as error:
            if opened is not None:
                raise
            # The journal or Redis cannot be used: the app is not started. Not logged:
            # servers report a failed startup's message (trio_bg serve, in one line).
            self._lifespan_failure = f"the background nursery could not start: {error}"
            return {"type": "lifespan.startup.failed", "message": self._lifespan_failure}
        finally:  # (also when the lifespan itself is cancelled mid-drain)
            if opened is not None:
                self._report = opened._report
        if failure is not None:
            return self._failed("startup", failure)
        failure = await app.shutdown()
        if failure is not None:
            return self._failed("shutdown", failure)
        return {"type": "lifespan.shutdown.complete"}

    async def _until_shutdown(self, receive: Receive, nursery: BackgroundNursery) -> None:
        """Wait for lifespan.shutdown; or, should a task raise KeyboardInterrupt or
        SystemExit, ask the server to stop (then wait for it), or stop waiting."""

        async def on_fatal(waiting: trio.CancelScope) -> None:
            await stopping(nursery)  # the nursery is draining itself meanwhile
            if fatal(nursery) is None:
                return
            if self._stop_server is None:
                waiting.cancel()
            else:
                self._stop_server()  # trio_bg.serve: stop serving gracefully

        async with trio.open_nursery() as waiting:
            waiting.start_soon(on_fatal, waiting.cancel_scope)
            await expect(receive, "lifespan.shutdown")
            waiting.cancel_scope.cancel()

    def _failed(self, phase: str, message: str) -> Message:
        """The wrapped app's lifespan ``phase`` failed: log it (Hypercorn drops the
        message), keep it for `trio_bg.serve`, and tell the server."""
        logger.error("the app's lifespan %s failed: %s", phase, message)
        self._lifespan_failure = f"the app's lifespan {phase}: {message}"
        return {"type": f"lifespan.{phase}.failed", "message": message}


def _is_overload(exc: BaseException) -> bool:
    """Whether ``exc`` is `Overloaded`, alone or in a group (a handler's own nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(Overloaded)[1] is None
    return isinstance(exc, Overloaded)


def _completes_response(kind: str, message: Message) -> bool:
    """Whether handing ``message`` (not a start or body message) to the server
    completes the HTTP response."""
    if kind == "http.response.trailers":
        return not message.get("more_trailers", False)
    return kind in ("http.response.pathsend", "http.response.zerocopysend") and not (
        message.get("more_body", False)
    )


# What the package asks of a middleware beyond its public face (trio_bg.serve, the
# command line), read here, where those attributes live.


def lifespan_failure(middleware: BackgroundTaskMiddleware) -> str | None:
    """What went wrong in the lifespan (the wrapped app's startup or shutdown, or a
    nursery that could not start), for `trio_bg.serve`; None if nothing did."""
    return middleware._lifespan_failure


def report_if_any(middleware: BackgroundTaskMiddleware) -> ShutdownReport | None:
    """The shutdown report, or None if no nursery ran (it could not start)."""
    return middleware._report


def settings_of(middleware: BackgroundTaskMiddleware) -> Settings:
    """The nursery's options ``middleware`` was made with."""
    return middleware._settings


def stop_server_with(middleware: BackgroundTaskMiddleware, stop: Callable[[], object]) -> None:
    """Have ``middleware`` call ``stop`` (stop serving gracefully) should a task raise
    KeyboardInterrupt or SystemExit, rather than raise it from the lifespan."""
    middleware._stop_server = stop


def nursery_if_open(middleware: BackgroundTaskMiddleware) -> BackgroundNursery | None:
    """The middleware's nursery, or None before its lifespan started one."""
    return middleware._nursery
