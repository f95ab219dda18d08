"""``python -m trio_bg worker MODULE:NAME``: run a streaq worker's tasks on trio, through
Redis restarts, until a signal stops it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, cast

import trio

from .._running.values import (
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    bind_address,
    describe_error,
    load_attribute,
    positive_int,
)

if TYPE_CHECKING:
    from streaq import Worker

    from .._web.asgi import ASGIApp

EXIT_WORKER_FAILED = 3

FIRST_DELAY = 0.1
"""Seconds from a Redis failure to the next connection; doubled at each failure in a row."""

MAX_DELAY = 5.0
"""The most seconds between two connections while Redis fails."""

WORKER_EPILOG = f"""\
NAME is a streaq Worker that keeps its tasks as JSON: made with trio_bg.streaq.worker(),
or an app wrapped in BackgroundTaskMiddleware with one (streaq=): then its worker runs.
The worker takes its tasks from Redis and runs them on trio until a signal stops it.

SIGTERM or SIGINT (Ctrl+C) stops it gracefully: it takes no new task, gives the running
ones the worker's grace_period to finish, and hands those still running then back to
the queue. Tasks it had taken but not started go to another worker after the worker's
idle_timeout.

A task whose record the worker cannot read (not JSON, or not a task's shape) is set
aside: acknowledged, its result stored as failed ("malformed task record: ..."), and
logged at ERROR without its data; the worker goes on.

When Redis fails (a restart, a lost connection, a failover, an error), the worker
logs it and connects again after {FIRST_DELAY:g} s, then twice as long each time up
to {MAX_DELAY:g} s, until Redis answers or a signal stops it. The worker's lifespan
(its lifespan= context) is entered once, around all the connections.

With --metrics HOST:PORT it serves the Prometheus metrics of the tasks it runs there
(any path): trio_bg_tasks_total, trio_bg_task_duration_seconds and
trio_bg_task_wait_seconds by task name (the wait: since the task was enqueued), and
trio_bg_tasks_running. It needs prometheus_client: pip install 'trio-bg[prometheus]'.

exit status:
  {EXIT_OK}  stopped by a signal, or with --burst, once the queue was empty
  {EXIT_USAGE}  usage error: a bad option, NAME cannot be loaded, or is not a streaq
     worker that keeps its tasks as JSON
  {EXIT_WORKER_FAILED}  the worker failed: an error that is not Redis's (logged with its
     traceback)
"""

logger = logging.getLogger("trio_bg")


def add_worker_parser(commands: Any) -> None:
    """Add the ``worker`` command to the command line's subcommands."""
    parser = add_command(
        commands,
        "worker",
        "run the tasks of a streaq worker (trio_bg.streaq) on trio",
        "Run the tasks of a streaq worker on trio, until a signal stops it.",
        WORKER_EPILOG,
    )
    parser.add_argument(
        "worker",
        metavar="MODULE:NAME",
        help="the streaq worker to run, or an app whose BackgroundTaskMiddleware has one",
    )
    parser.add_argument("--burst", action="store_true", help="stop once the queue is empty")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="tasks running at once; the worker also takes up to N more from the queue "
        "ahead of time (default: the worker's concurrency, streaq's default 16)",
    )
    parser.add_argument(
        "--metrics",
        type=bind_address,
        metavar="HOST:PORT",
        help="serve the Prometheus metrics of the tasks it runs there (prometheus extra)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG on stderr (default INFO)"
    )
    parser.set_defaults(worker_parser=parser)


def worker_command(args: argparse.Namespace) -> int:
    """Run ``worker``; return the exit status."""
    parser: argparse.ArgumentParser = args.worker_parser
    try:
        from .._keeping import streaq_worker  # noqa: F401 -- streaq is optional: serving needs none
    except ModuleNotFoundError as error:
        if error.name != "streaq":
            raise
        parser.error("the worker needs streaq: pip install 'trio-bg[streaq]'")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # coredis logs each command it retries at INFO, a traceback's worth
        logging.getLogger("coredis").setLevel(logging.WARNING)
    try:
        worker: Any = load_streaq_worker(args.worker)
    except LookupError as error:
        parser.error(str(error))  # exits with status 2
    except WorkerRefused as error:
        parser.error(f"cannot run {args.worker!r}: {error}")
    except Exception:  # the worker's module raised on import: show where
        logger.exception("cannot load %s", args.worker)
        return EXIT_USAGE
    if args.burst:
        worker.burst = True
    if args.concurrency is not None:
        worker.concurrency = args.concurrency
        worker.prefetch = 2 * args.concurrency  # as streaq's __init__ sets it from concurrency
    metrics = None
    if args.metrics is not None:
        try:
            from .._web.metrics_endpoint import worker_app
        except ImportError as error:
            parser.error(f"--metrics: {error}")
        metrics = worker_app(worker)
    try:
        trio.run(run_worker, worker, *(() if metrics is None else (metrics, args.metrics)))
    except Exception as error:
        logger.error("the worker failed", exc_info=error)
        return EXIT_WORKER_FAILED
    return EXIT_OK


async def run_worker(
    worker: Worker[Any], metrics: ASGIApp | None = None, bind: str | None = None
) -> None:
    """Run ``worker`` until a signal stops it (or, with ``burst``, until its queue is
    empty), connecting to Redis again each time Redis fails; and serve ``metrics`` on
    ``bind`` meanwhile, if given."""
    from coredis.exceptions import RedisError

    # While the worker runs, streaq's own handler takes the signals and stops it
    # gracefully; a Redis failure after that ends the run instead of reconnecting.
    stopping = trio.Event()
    handler = worker.signal_handler

    async def signal_handler(scope: Any) -> None:
        await handler(scope)
        stopping.set()

    worker.signal_handler = signal_handler  # type: ignore[method-assign]
    # Before, between and after the runs, this one does: nothing is running to wait for.
    reconnecting = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, reconnecting)
            if metrics is not None and bind is not None:
                await nursery.start(_serve_metrics, metrics, bind)
            # streaq enters the worker's lifespan at each run, which a context manager
            # made by @asynccontextmanager refuses the second time.
            async with worker.lifespan as context:
                worker.lifespan = _Entered(context)
                with reconnecting:
                    await _run(worker, stopping, (RedisError, OSError))
            nursery.cancel_scope.cancel()


async def _run(
    worker: Worker[Any], stopping: trio.Event, failures: tuple[type[Exception], ...]
) -> None:
    delay = FIRST_DELAY
    while True:
        # What a run that Redis cut short leaves behind in streaq (7)'s state: it counts
        # the tasks it took until they finish, and at its prefetch it would take no more.
        worker._count = 0
        worker._stream_empty = False
        failed: BaseExceptionGroup[Exception] | None = None
        started = trio.current_time()
        try:
            await worker.run_async()
        except* failures as group:  # coredis's errors; a timeout is an OSError
            failed = group
        if failed is None:
            return  # stopped by a signal, or the burst is over
        if trio.current_time() - started >= MAX_DELAY:
            delay = FIRST_DELAY  # it ran a while: a new failure, not the last one again
        reasons = describe_error(failed, once=True)
        if stopping.is_set():
            logger.error(
                "streaq worker %s lost Redis while stopping (%s): the tasks it had taken go "
                "to another worker after its idle_timeout",
                worker.id,
                reasons,
            )
            return
        logger.error(
            "streaq worker %s cannot use Redis (%s): connecting again in %gs",
            worker.id,
            reasons,
            delay,
        )
        await trio.sleep(delay)
        delay = min(2 * delay, MAX_DELAY)


async def _serve_metrics(
    metrics: ASGIApp, bind: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``metrics`` on ``bind`` with Hypercorn until cancelled (it logs where)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logger
    await serve(metrics, config, task_status=task_status, mode="asgi")  # type: ignore[arg-type]


async def _stop_on_signal(signals: AsyncIterator[int], reconnecting: trio.CancelScope) -> None:
    async for number in signals:
        logger.info("received %s: the worker stops", signal.Signals(number).name)
        reconnecting.cancel()


class _Entered(AbstractAsyncContextManager[Any]):
    """A lifespan entered already: each ``async with`` gives its context again."""

    def __init__(self, context: Any) -> None:
        self.context = context

    async def __aenter__(self) -> Any:
        return self.context

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def load_streaq_worker(spec: str) -> Worker[Any]:
    """The streaq worker at ``module:name``: a worker made by `trio_bg.streaq.worker`,
    or the worker of a `BackgroundTaskMiddleware` given one (``streaq=``). `LookupError`
    when there is none there, `WorkerRefused` when `trio_bg.streaq.check_worker` refuses
    it; whatever the module raises on import goes through."""
    from .._keeping.streaq_worker import check_worker
    from .._web.middleware import BackgroundTaskMiddleware, settings_of

    target = load_attribute(spec, what="worker")
    if isinstance(target, BackgroundTaskMiddleware):
        target = settings_of(target).streaq
        if target is None:
            raise LookupError(
                f"cannot run {spec!r}: it is a BackgroundTaskMiddleware with no streaq worker "
                f"(streaq=)"
            )
    try:
        check_worker(target)
    except TypeError as error:
        raise WorkerRefused(str(error)) from None
    return cast("Worker[Any]", target)


class WorkerRefused(Exception):
    """What `load_streaq_worker` found is no streaq worker trio_bg runs (the reason)."""
