"""The app the multi-worker tests serve: one worker's tasks are short, the other's long.

Served as ``worker_app:app`` from this directory by ``hypercorn -w 2`` and by
``python -m trio_bg serve --workers 2``. Each worker process claims a role at its
lifespan startup: the first to create ``$TRIO_BG_TEST_ROLES/long`` is the *long*
worker (its tasks sleep ``$TRIO_BG_TEST_LONG`` seconds), every other one is *short*
(``$TRIO_BG_TEST_SHORT`` seconds). So, on SIGTERM, the short worker finishes its
drain first, and the long one is still draining: the case Hypercorn's supervisor gets
wrong. Each response says which worker answered (``{"pid": ..., "role": ...}``) and,
in ``x-trio-bg-tasks``, how many tasks it added; each task logs ``task done`` when it
ends. The grace period is ``$TRIO_BG_TEST_GRACE`` (default 10 s). Logging is set up
to show INFO, unless ``$TRIO_BG_TEST_NO_LOGGING_SETUP`` is set.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import trio

import trio_bg
from trio_bg._web.middleware import Receive, Scope, Send

# Under Hypercorn's CLI nothing else sets up logging: show every INFO line of trio_bg's
# too, unless the test is of plain Hypercorn, where no one sets up logging.
if not os.environ.get("TRIO_BG_TEST_NO_LOGGING_SETUP"):
    logging.basicConfig(
        level=logging.INFO, format="%(process)d %(levelname)s %(name)s: %(message)s"
    )
logger = logging.getLogger("worker_app")
ROLE: list[str] = []  # this process's role, once claimed


def claim_role() -> str:
    roles = os.environ.get("TRIO_BG_TEST_ROLES")
    if roles is None:
        return "short"
    try:
        os.close(os.open(Path(roles) / "long", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return "short"
    return "long"


async def work(role: str, seconds: float) -> None:
    await trio.sleep(seconds)
    logger.warning("task done: pid=%d role=%s", os.getpid(), role)


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            if kind == "startup":
                ROLE.append(claim_role())
                logger.warning("worker pid=%d role=%s", os.getpid(), ROLE[0])
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    role = ROLE[0] if ROLE else "short"
    default = "0.1" if role == "short" else "2"
    seconds = float(os.environ.get(f"TRIO_BG_TEST_{role.upper()}", default))
    trio_bg.current_tasks().add_task(work, role, seconds)
    body = json.dumps({"pid": os.getpid(), "role": role}).encode()
    headers = [(b"content-type", b"application/json"), (b"x-trio-bg-tasks", b"1")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = trio_bg.BackgroundTaskMiddleware(
    inner, grace_period=float(os.environ.get("TRIO_BG_TEST_GRACE", "10"))
)
