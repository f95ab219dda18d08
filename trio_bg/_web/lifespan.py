"""The wrapped app's own lifespan, run beside the nursery's, and what a lifespan says
when it cannot run trio_bg (not on trio) or has shut down (its report)."""

from __future__ import annotations

import logging
import math

import trio

from .._engine.report import ShutdownReport
from .asgi import ASGIApp, Message, Scope

logger = logging.getLogger("trio_bg")

NOT_TRIO = (
    "trio_bg's background nursery runs on trio, and this lifespan does not: serve the app "
    "with `hypercorn --worker-class trio` (or trio_bg.serve); in tests, "
    'trio_bg.starlette.TestClient (or Starlette\'s `TestClient(app, backend="trio")`), '
    '`anyio_backend = "trio"` (pytest with anyio, asgi-lifespan), or '
    "trio_bg.testing.open_test_client. (On its asyncio worker, Hypercorn still exits with "
    "status 0 after this: an app can only send lifespan.startup.failed; the status is "
    "Hypercorn's.)"
)


def show_report(report: ShutdownReport) -> None:
    """Show a complete shutdown's report where no logging was set up (plain
    ``hypercorn``): logged at INFO, it went nowhere; Hypercorn's error log has a handler.
    A report with tasks cut short is a WARNING, which Python shows in any case."""
    if report.all_completed and not logger.hasHandlers():
        server_log = logging.getLogger("hypercorn.error")
        if server_log.handlers:
            server_log.info("background tasks shut down: %s", report)


class WrappedLifespan:
    """Drives the wrapped app's own lifespan handler, for apps that have one."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self._app = app
        self._scope = scope
        self._to_app, self._app_inbox = trio.open_memory_channel[Message](math.inf)
        self._from_app, self._replies = trio.open_memory_channel[Message](math.inf)
        self._supported = True
        self._error: Exception | None = None
        self._received = 0  # lifespan messages the app has read

    async def _receive(self) -> Message:
        message = await self._app_inbox.receive()
        self._received += 1
        return message

    async def run(self) -> None:
        try:
            await self._app(self._scope, self._receive, self._from_app.send)
        except Exception as exc:
            self._error = exc
        finally:
            self._from_app.close()  # the app ended: _ask gets EndOfChannel from now on

    async def startup(self) -> str | None:
        """Start the app; return its failure message, or None when it started (or
        does not speak lifespan)."""
        reply = await self._ask({"type": "lifespan.startup"})
        if reply is None and self._error is not None and self._received:
            # It read lifespan.startup, then crashed: its startup failed (the ASGI
            # "raise to decline lifespan" happens before reading anything).
            logger.error("the wrapped app's lifespan startup raised", exc_info=self._error)
            return f"the app's startup raised {self._error!r}"
        if reply is None:
            self._supported = False
            logger.info(
                "the wrapped app does not handle lifespan events (%s); serving it without",
                f"it raised {self._error!r}" if self._error else "it returned",
            )
            return None
        if reply["type"] == "lifespan.startup.failed":
            return str(reply.get("message", ""))
        return None

    async def shutdown(self) -> str | None:
        """Shut the app down; return its failure message, or None."""
        if not self._supported:
            return None
        reply = await self._ask({"type": "lifespan.shutdown"})
        if reply is None:
            if self._error is None:
                return None
            logger.error("the wrapped app's lifespan shutdown raised", exc_info=self._error)
            return f"the app's shutdown raised {self._error!r}"
        if reply["type"] == "lifespan.shutdown.failed":
            return str(reply.get("message", ""))
        return None

    async def _ask(self, message: Message) -> Message | None:
        """Send ``message`` to the app and wait for its reply (None: the app ended)."""
        await self._to_app.send(message)
        try:
            return await self._replies.receive()
        except trio.EndOfChannel:
            return None
