"""serve(): Hypercorn's trio server with the middleware applied, and SIGTERM/SIGINT turned
into a graceful shutdown in this process."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from typing import Unpack

import hypercorn.trio
import trio
from hypercorn.config import Config

from ._asgi import ASGIApp, BackgroundTaskMiddleware
from ._options import NurseryOptions
from ._report import ShutdownReport

SHUTDOWN_MARGIN = 5.0
"""Seconds Hypercorn's ``shutdown_timeout`` must exceed ``grace_period`` by: room for
cancelling what the grace period left, and for the app's own lifespan shutdown."""

SIGNALS = (signal.SIGTERM, signal.SIGINT)

logger = logging.getLogger("trio_bg")


async def serve(
    app: ASGIApp,
    config: Config | None = None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[NurseryOptions],
) -> ShutdownReport:
    """Serve ``app`` with ``hypercorn.trio.serve`` until SIGTERM or SIGINT; return the
    `ShutdownReport` of its background tasks.

    ``app`` is wrapped in `BackgroundTaskMiddleware` with ``options`` (those of
    `open_background_nursery`), unless it already is one; then ``options`` must be
    empty. ``config`` is a Hypercorn `Config` (default: 127.0.0.1:8000); its
    ``shutdown_timeout`` must exceed ``grace_period`` by `SHUTDOWN_MARGIN` seconds
    (`ValueError` otherwise, before anything starts).

    The first signal starts a graceful shutdown: Hypercorn stops listening, gives
    in-flight requests ``graceful_timeout`` seconds, then the background tasks get
    ``grace_period`` seconds to finish. A second signal cancels the background tasks
    at once; the report still names every task. ``task_status`` is Hypercorn's: with
    ``nursery.start`` it gives the bound addresses. Run it with
    ``trio.run(trio_bg.serve, app)``.
    """
    middleware = wrap(app, options)
    config = _checked_config(config, middleware.grace_period)
    shutdown = trio.Event()
    # Opened before Hypercorn starts: a signal sent once the addresses are known (or
    # during startup) is never delivered to Python's default handler.
    with trio.open_signal_receiver(*SIGNALS) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, signals, shutdown, middleware)
                await hypercorn.trio.serve(
                    middleware,  # type: ignore[arg-type]  # hypercorn's Framework union is narrower
                    config,
                    shutdown_trigger=shutdown.wait,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Raise what hypercorn.trio.serve raised, not our nursery's group around it.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise
    return middleware.report


def wrap(app: ASGIApp, options: NurseryOptions) -> BackgroundTaskMiddleware:
    """``app`` in a `BackgroundTaskMiddleware` with ``options``; an app that already
    is one is returned as it is, and then ``options`` must be empty (`TypeError`)."""
    if not isinstance(app, BackgroundTaskMiddleware):
        return BackgroundTaskMiddleware(app, **options)
    if options:
        raise TypeError(
            f"the app is already a BackgroundTaskMiddleware, so serve() cannot apply the "
            f"option(s) {', '.join(sorted(options))}: pass them to the middleware instead, "
            f"or pass serve() the unwrapped app"
        )
    return app


def _checked_config(config: Config | None, grace_period: float) -> Config:
    """The user's config, checked; or a default one that leaves room for the drain."""
    if config is None:
        return default_config(grace_period)
    needed = grace_period + SHUTDOWN_MARGIN
    if config.shutdown_timeout < needed:
        raise ValueError(
            f"Hypercorn's shutdown_timeout ({config.shutdown_timeout:g}s) is too short for a "
            f"grace_period of {grace_period:g}s: Hypercorn would abandon the background tasks "
            f"mid-drain. Set config.shutdown_timeout to at least {needed:g} (grace_period "
            f"+ {SHUTDOWN_MARGIN:g}s), or shorten grace_period."
        )
    return config


def default_config(grace_period: float) -> Config:
    """Hypercorn's default `Config`, bound to 127.0.0.1:8000, with a ``shutdown_timeout``
    long enough for ``grace_period``."""
    config = Config()
    config.bind = ["127.0.0.1:8000"]
    config.shutdown_timeout = max(config.shutdown_timeout, grace_period + SHUTDOWN_MARGIN)
    return config


async def _on_signals(
    signals: AsyncIterator[int], shutdown: trio.Event, middleware: BackgroundTaskMiddleware
) -> None:
    """First signal: graceful shutdown. Any later one: cancel the background tasks now."""
    async for number in signals:
        name = signal.Signals(number).name
        if not shutdown.is_set():
            logger.info(
                "%s received: shutting down gracefully (send it again to cancel the "
                "background tasks at once)",
                name,
            )
            shutdown.set()
            continue
        try:
            nursery = middleware.nursery
        except RuntimeError:
            logger.warning("%s received again: no background tasks are running", name)
            continue
        logger.warning("%s received again: cancelling the background tasks now", name)
        nursery.cancel()
