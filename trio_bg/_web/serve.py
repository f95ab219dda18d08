"""serve(): Hypercorn's trio server with the middleware applied, and SIGTERM/SIGINT turned
into a graceful shutdown in this process; serve_worker(): the same, as one worker of
``python -m trio_bg serve --workers N``, also taking commands from its supervisor."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Unpack

import hypercorn.trio
import trio
from hypercorn.config import Config

from .._engine.report import ShutdownReport
from .._running.nursery import fatal
from .._running.options import NurseryOptions
from .middleware import ASGIApp, BackgroundTaskMiddleware, stop_server_with

SHUTDOWN_MARGIN = 5.0
"""Seconds Hypercorn's ``shutdown_timeout`` must exceed ``grace_period`` by: room for
cancelling what the grace period left, and for the app's own lifespan shutdown."""

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# A worker's protocol with its supervisor, one command a line on the worker's stdin (a
# socket): the supervisor sends STOP (a graceful shutdown) and CANCEL (cancel the
# background tasks now); the worker answers READY once it serves.
STOP = b"stop"
CANCEL = b"cancel"
READY = b"ready"

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
    at once; the report still names every task. A task (or hook) that raises
    KeyboardInterrupt or SystemExit starts the same graceful shutdown, and is raised
    again once it is done (the report is then ``middleware.report``). ``task_status``
    is Hypercorn's: with ``nursery.start`` it gives the bound addresses. Run it with
    ``trio.run(trio_bg.serve, app)``.

    It serves in this process. For several worker processes, whose drains the shutdown
    all waits for, use ``python -m trio_bg serve module:app --workers N``: each worker
    imports the app itself (an app object cannot cross into another process).
    """
    return await _serve(wrap(app, options), config, None, task_status)


async def serve_worker(middleware: BackgroundTaskMiddleware, config: Config) -> ShutdownReport:
    """`serve`, as a worker of ``python -m trio_bg serve --workers N``: also obey the
    supervisor's commands on stdin, and answer `READY` there once serving (not after a
    failed startup).

    `STOP` starts the graceful shutdown, or does nothing if a signal already did: with
    ``kill -TERM -PGID`` (or systemd's control-group kill, or Ctrl+C) the worker gets the
    signal itself *and* the supervisor's `STOP`, which must not count as a second signal.
    Only a second signal or `CANCEL` cancels the background tasks. The end of stdin (the
    supervisor is gone) is `STOP`.
    """
    async with trio.lowlevel.FdStream(os.dup(0)) as control:
        return await _serve(middleware, config, control, trio.TASK_STATUS_IGNORED)


async def _serve(
    middleware: BackgroundTaskMiddleware,
    config: Config | None,
    control: trio.abc.Stream | None,
    task_status: trio.TaskStatus[list[str]],
) -> ShutdownReport:
    config = _checked_config(config, middleware.grace_period)
    shutdown = _Shutdown(middleware)
    # A task's KeyboardInterrupt or SystemExit: stop serving gracefully, then raise it.
    stop_server_with(middleware, shutdown.graceful)
    # Opened before Hypercorn starts: a signal sent once the addresses are known (or
    # during startup) is never delivered to Python's default handler.
    with trio.open_signal_receiver(*SIGNALS) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, signals, shutdown)
                if control is not None:
                    nursery.start_soon(_on_commands, control, shutdown)
                binds = await nursery.start(
                    _run_hypercorn, middleware, config, shutdown, nursery.cancel_scope
                )
                if control is not None and _started(middleware):
                    with contextlib.suppress(trio.BrokenResourceError):  # then it sees the end
                        await control.send_all(READY + b"\n")
                task_status.started(binds)
        except BaseExceptionGroup as group:
            # Raise what hypercorn.trio.serve raised, not our nursery's group around it.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise
    if (raised := fatal(middleware.nursery)) is not None:
        raise raised  # the report is made: middleware.report
    return middleware.report


async def _run_hypercorn(
    middleware: BackgroundTaskMiddleware,
    config: Config,
    shutdown: _Shutdown,
    done: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    await hypercorn.trio.serve(
        middleware,  # type: ignore[arg-type]  # hypercorn's Framework union is narrower
        config,
        shutdown_trigger=shutdown.requested.wait,
        task_status=task_status,
    )
    done.cancel()  # the listeners for signals and commands are done too


def _started(middleware: BackgroundTaskMiddleware) -> bool:
    """Whether the app's startup succeeded. (Hypercorn also binds and reports its
    addresses after a failed startup, and only then fails.)"""
    try:
        return not middleware.nursery.closed
    except RuntimeError:  # no lifespan.startup came
        return False


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


class _Shutdown:
    """The server's shutdown, whichever source asks for it: signals, or a supervisor."""

    def __init__(self, middleware: BackgroundTaskMiddleware) -> None:
        self.requested = trio.Event()
        self._middleware = middleware

    def graceful(self) -> bool:
        """Start the graceful shutdown; False if it had started already."""
        started = not self.requested.is_set()
        self.requested.set()
        return started

    def cancel(self, source: str) -> None:
        """Cancel the background tasks now (and stop serving, if not stopping yet)."""
        self.requested.set()
        try:
            nursery = self._middleware.nursery
        except RuntimeError:
            logger.warning("%s: no background tasks are running", source)
            return
        logger.warning("%s: cancelling the background tasks now", source)
        nursery.cancel()


async def on_signals(
    signals: AsyncIterator[int], first: Callable[[str], object], again: Callable[[str], object]
) -> None:
    """Call ``first(name)`` for the first signal, ``again(name)`` for each later one (the
    rule of `serve` and of the ``--workers`` supervisor: graceful, then at once)."""
    handle = first
    async for number in signals:
        handle(signal.Signals(number).name)
        handle = again


async def _on_signals(signals: AsyncIterator[int], shutdown: _Shutdown) -> None:
    """First signal: graceful shutdown. Any later one: cancel the background tasks now."""

    def first(name: str) -> None:
        logger.info(
            "%s received: %s (send it again to cancel the background tasks at once)",
            name,
            "shutting down gracefully" if shutdown.graceful() else "already shutting down",
        )

    await on_signals(signals, first, lambda name: shutdown.cancel(f"{name} received again"))


async def _on_commands(control: trio.abc.ReceiveStream, shutdown: _Shutdown) -> None:
    """The supervisor's commands (see `serve_worker`), until the end of the stream."""
    pending = b""
    with contextlib.suppress(trio.BrokenResourceError):  # the supervisor died: as an end
        while data := await control.receive_some():
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if line == STOP:
                    if shutdown.graceful():
                        logger.info("stop from the supervisor: shutting down gracefully")
                elif line == CANCEL:
                    shutdown.cancel("cancel from the supervisor")
                else:
                    logger.warning("unknown command from the supervisor: %r", line)
    if shutdown.graceful():
        logger.warning("the supervisor is gone: shutting down gracefully")
