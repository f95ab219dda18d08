"""A FastAPI app whose background tasks run in trio_bg's nursery.

FastAPI runs on trio through AnyIO. Run it from the repository root with Hypercorn's
trio worker::

    hypercorn --worker-class trio examples.fastapi_app:app

then ``curl -X POST 'http://127.0.0.1:8000/signup?email=ada@example.com'`` (or
``curl -i -X POST http://127.0.0.1:8000/exports``: ``202 Accepted``, and a ``Location``
where the export's status is) and stop the server with Ctrl+C: the log shows the
background tasks run after each response, and drained (up to the grace period) before
the app's own lifespan shuts down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import trio
from fastapi import BackgroundTasks, Depends, FastAPI, Response

import trio_bg
import trio_bg.fastapi
import trio_bg.status
from examples._logging import show_logs

logger = logging.getLogger("examples.fastapi_app")

show_logs(__name__)


@trio_bg.task(timeout=30)  # a stable name in reports, and a time limit
async def send_welcome_email(email: str) -> None:
    await trio.sleep(1)  # stands in for talking to an SMTP server
    logger.info("sent a welcome e-mail to %s", email)


def write_audit_line(line: str) -> None:
    """A plain function: it runs in one of trio_bg's worker threads."""
    logger.info("audit: %s", line)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's own startup and shutdown; trio_bg drains its tasks before the latter."""
    logger.info("app startup")
    yield
    logger.info("app shutdown (the background tasks are done)")


app = FastAPI(lifespan=lifespan)
# Before the routes: from here on, FastAPI's own BackgroundTasks hand their tasks to
# trio_bg (one after another per request with ordered=True, as FastAPI runs them).
trio_bg.fastapi.install(app, grace_period=10.0, ordered=True)


def audited(background_tasks: BackgroundTasks, email: str) -> str:
    """A dependency: its task is added first, so (ordered) it runs first."""
    background_tasks.add_task(write_audit_line, f"signup of {email}")
    return email


@app.post("/signup")
async def signup(
    email: Annotated[str, Depends(audited)], background_tasks: BackgroundTasks
) -> dict[str, str]:
    """Plain FastAPI code: the tasks run in the server's nursery once the response is
    complete, not inline in this request, and shutdown drains them."""
    background_tasks.add_task(send_welcome_email, email)
    return {"status": "welcome", "email": email}


@trio_bg.task(name="exports.build")
async def build_export(rows: int) -> dict[str, int]:
    """A task a client waits for: its progress and result show in its status."""
    for done in range(0, rows, 100):
        trio_bg.set_progress(done / rows, f"{done} of {rows} rows")
        await trio.sleep(0.1)  # stands in for the work
    return {"rows": rows}


@app.post("/exports", status_code=202)
async def start_export(tasks: trio_bg.fastapi.Tasks, response: Response) -> dict[str, str]:
    """The 202 pattern: answer at once, with where to look (trio_bg's own
    BackgroundTasks, ``tasks``, returns a handle; FastAPI's returns None)."""
    handle = tasks.add_task(build_export, 500)
    response.headers["location"] = f"/tasks/{handle.id}"
    return {"id": handle.id}


# GET /tasks/{id}: a task's status as JSON. public=True for the example only: a status
# shows results and errors, so guard it with authorize=check(scope).
app.mount("/tasks", trio_bg.status.app(public=True))


@app.get("/stats")
async def stats() -> dict[str, int]:
    """What the nursery is doing now (for a health or metrics endpoint)."""
    current = trio_bg.fastapi.middleware_of(app).nursery.stats
    return {"running": current.running, "pending": current.pending, "failed": current.failed}
