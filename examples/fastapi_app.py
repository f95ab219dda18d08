"""A FastAPI app whose endpoints start background work with trio_bg.

FastAPI runs on trio through AnyIO. Run it from the repository root with Hypercorn's
trio worker::

    hypercorn --worker-class trio examples.fastapi_app:app

then ``curl -X POST 'http://127.0.0.1:8000/signup?email=ada@example.com'`` and stop the
server with Ctrl+C: the log shows the background tasks drained (up to the grace
period) before the app's own lifespan shuts down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from fastapi import BackgroundTasks, FastAPI

import trio_bg
import trio_bg.fastapi
from examples._logging import show_logs
from trio_bg.fastapi import Tasks

logger = logging.getLogger("examples.fastapi_app")

show_logs(__name__)


@trio_bg.task(timeout=30)  # a stable name in reports, and a time limit
async def send_welcome_email(email: str) -> None:
    await trio.sleep(1)  # stands in for talking to an SMTP server
    logger.info("sent a welcome e-mail to %s", email)


def write_audit_line(line: str) -> None:
    """A plain function: FastAPI's own BackgroundTasks runs it inline, in a thread."""
    logger.info("audit: %s", line)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's own startup and shutdown; trio_bg drains its tasks before the latter."""
    logger.info("app startup")
    yield
    logger.info("app shutdown (the background tasks are done)")


app = FastAPI(lifespan=lifespan)


@app.post("/signup")
async def signup(email: str, tasks: Tasks) -> dict[str, str]:
    """``tasks`` is the request's trio_bg.BackgroundTasks: its tasks run in the
    server's nursery once the response is complete."""
    tasks.add_task(send_welcome_email, email)
    return {"status": "welcome", "email": email}


@app.get("/legacy")
def legacy(background_tasks: BackgroundTasks) -> dict[str, str]:
    """FastAPI's own BackgroundTasks keeps working unchanged, with its own semantics."""
    background_tasks.add_task(write_audit_line, "legacy endpoint called")
    return {"status": "ok"}


@app.get("/stats")
async def stats() -> dict[str, int]:
    """What the nursery is doing now (for a health or metrics endpoint)."""
    current = trio_bg.fastapi.middleware_of(app).nursery.stats
    return {"running": current.running, "pending": current.pending, "failed": current.failed}


# Equivalent to app.add_middleware(trio_bg.BackgroundTaskMiddleware, grace_period=10.0)
# plus an exception handler answering trio_bg.Overloaded with a 503.
trio_bg.fastapi.install(app, grace_period=10.0)
