"""Inside a worker process of Hypercorn's own supervisor (``hypercorn -w N``): keep
SIGTERM from killing the worker while its background tasks drain.

On SIGTERM, Hypercorn's parent sets a shared shutdown event, waits for the *first*
worker to exit, then ``terminate()``s (SIGTERM) the others, mid-drain; and with
``kill -TERM -PGID`` or systemd's ``KillMode=control-group`` every worker gets a
SIGTERM of its own at once. Either way the default action kills the worker with no
drain and no report. A worker that ignores SIGTERM instead finishes its shutdown when
the shared event tells it to (Hypercorn's parent joins its non-daemon workers before it
exits), so its tasks drain and are reported. SIGKILL still kills.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from typing import Any

import trio

logger = logging.getLogger("trio_bg")


def hypercorn_worker_config() -> Any | None:
    """Hypercorn's `Config`, when this process is a worker that Hypercorn's supervisor
    started (``hypercorn --worker-class trio``); else None."""
    if multiprocessing.parent_process() is None:
        return None
    process = multiprocessing.current_process()
    # Hypercorn starts each worker as Process(target=trio_worker, kwargs={"config": ...}).
    target = getattr(process, "_target", None)
    if getattr(target, "__module__", None) != "hypercorn.trio.run":
        return None
    kwargs = getattr(process, "_kwargs", None)
    return kwargs.get("config") if isinstance(kwargs, dict) else None


async def ignore_sigterm(
    config: Any, grace_period: float, *, task_status: trio.TaskStatus[None]
) -> None:
    """Ignore SIGTERM until cancelled (logging the first one); say so at startup, and warn when
    Hypercorn's ``shutdown_timeout`` would cut the drain short."""
    if threading.current_thread() is not threading.main_thread():
        logger.error(
            "trio_bg cannot keep SIGTERM from killing this Hypercorn worker (trio is not "
            "running in the main thread): background tasks may be lost at shutdown; serve "
            "with `python -m trio_bg serve --workers N` instead"
        )
        task_status.started()
        return
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        _log_startup(config, grace_period)
        task_status.started()
        told = False
        async for _ in signals:
            # Said once: after `kill -TERM -PGID`, Hypercorn's parent terminate()s the
            # workers still draining, which is the same news again.
            if not told:
                told = True
                logger.warning(
                    "SIGTERM to Hypercorn worker %d ignored: it drains its background tasks "
                    "when Hypercorn's parent process shuts it down",
                    os.getpid(),
                )


def _log_startup(config: Any, grace_period: float) -> None:
    workers = getattr(config, "workers", 1)
    logger.info(
        "Hypercorn worker %d: SIGTERM to this worker is ignored, so that its background "
        "tasks drain when Hypercorn shuts down (signal Hypercorn's parent process; SIGKILL "
        "still kills)",
        os.getpid(),
    )
    if workers > 1:
        logger.warning(
            "hypercorn -w %d: each worker drains and reports on its own, and Hypercorn's "
            "exit status is only its first worker's; for one combined report and exit "
            "status, serve with `python -m trio_bg serve --workers %d`",
            workers,
            workers,
        )
    shutdown_timeout = getattr(config, "shutdown_timeout", None)
    if isinstance(shutdown_timeout, int | float) and shutdown_timeout <= grace_period:
        logger.warning(
            "Hypercorn's shutdown_timeout (%gs) is not longer than the grace period (%gs): "
            "Hypercorn gives up on the drain before it ends; shorten grace_period, or "
            "raise shutdown_timeout in Hypercorn's config",
            shutdown_timeout,
            grace_period,
        )
