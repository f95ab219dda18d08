"""A Starlette app whose endpoints start background work with trio_bg.

Starlette runs on trio through AnyIO. Run it from the repository root with
Hypercorn's trio worker::

    hypercorn --worker-class trio examples.starlette_app:app

then ``curl -X POST 'http://127.0.0.1:8000/signup?name=ada'`` (an ``async def``
endpoint) or ``curl 'http://127.0.0.1:8000/report'`` (a plain ``def`` endpoint, which
Starlette runs in a worker thread). ``curl -i -X POST 'http://127.0.0.1:8000/exports'``
answers ``202 Accepted`` with a ``Location`` to follow: ``/tasks/{id}``, the status of
the export as JSON (`trio_bg.status.app`, mounted). Open http://127.0.0.1:8000/dashboard/
for the live dashboard (`trio_bg.dashboard.app`, for this machine only). Stop the server
with Ctrl+C (or SIGTERM to Hypercorn) and watch the order in the log: the background
tasks are drained first, then the app's own lifespan shuts down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import Scope

import trio_bg
import trio_bg.dashboard
import trio_bg.status
from examples._logging import show_logs

logger = logging.getLogger("examples.starlette_app")

show_logs(__name__)


async def send_welcome_email(name: str) -> None:
    """An ``async def`` task: runs as a trio task, after the response was sent."""
    logger.info("sending a welcome e-mail to %s", name)
    await trio.sleep(1)  # stands in for talking to an SMTP server
    logger.info("sent a welcome e-mail to %s", name)


def render_report(requested_by: str) -> None:
    """A plain function task: runs in a worker thread of trio_bg's own limiter."""
    logger.info("rendering a report for %s", requested_by)
    time.sleep(0.5)  # stands in for blocking work
    logger.info("rendered a report for %s", requested_by)


async def signup(request: Request) -> PlainTextResponse:
    """An ``async def`` endpoint: it runs in the request's own trio task."""
    name = request.query_params.get("name", "world")
    trio_bg.current_tasks().add_task(send_welcome_email, name)
    return PlainTextResponse(f"Welcome, {name}! Check your inbox.\n")


def report(request: Request) -> PlainTextResponse:
    """A plain ``def`` endpoint: Starlette runs it in a worker thread, and
    `trio_bg.current_tasks` works there too (the request's context goes with it)."""
    client = request.client.host if request.client else "someone"
    trio_bg.current_tasks().add_task(render_report, client)
    return PlainTextResponse("Your report is being rendered.\n")


@trio_bg.task(name="exports.build")
async def build_export(rows: int) -> dict[str, int]:
    """A task a client waits for: its progress and result show in its status."""
    for done in range(0, rows, 100):
        trio_bg.set_progress(done / rows, f"{done} of {rows} rows")
        await trio.sleep(0.1)  # stands in for the work
    return {"rows": rows}


async def start_export(request: Request) -> JSONResponse:
    """The 202 pattern: answer at once, with where to look."""
    handle = trio_bg.current_tasks().add_task(build_export, 500)
    location = f"/tasks/{handle.id}"
    return JSONResponse({"id": handle.id}, status_code=202, headers={"location": location})


def from_this_machine(scope: Scope) -> bool:
    """The dashboard's guard: requests from this machine only. In production, ask your
    own authentication (a staff session, say) instead: see docs/dashboard.md."""
    client = scope.get("client")
    return client is not None and client[0] in ("127.0.0.1", "::1")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The app's own startup and shutdown (say, a database pool). trio_bg shuts the
    background tasks down *before* this shutdown runs, so tasks may use what it
    closes."""
    logger.info("app startup: opening resources")
    yield
    logger.info("app shutdown: closing resources (the background tasks are done)")


app = Starlette(
    routes=[
        Route("/signup", signup, methods=["POST"]),
        Route("/report", report),
        Route("/exports", start_export, methods=["POST"]),
        # GET /tasks/{id}: a task's status as JSON. public=True for the example only: a
        # status shows results and errors, so guard it with authorize=check(scope).
        Mount("/tasks", app=trio_bg.status.app(public=True)),
        # The live dashboard: counts, running and ended tasks, dead letters, cancel.
        Mount("/dashboard", app=trio_bg.dashboard.app(authorize=from_this_machine)),
    ],
    lifespan=lifespan,
    # Why a Starlette middleware rather than BackgroundTaskMiddleware(Starlette(...)):
    # both work, since Starlette passes lifespan scopes through its middleware stack
    # unchanged (ServerErrorMiddleware forwards every non-HTTP scope), so the
    # middleware opens its nursery at startup and drains it before forwarding
    # lifespan.shutdown to Starlette's router, which runs `lifespan` above. Inside the
    # stack, the middleware sits *within* ServerErrorMiddleware: when an endpoint
    # raises, the exception reaches the middleware before Starlette turns it into a
    # 500 page, so the failed request's tasks are discarded (and logged) instead of
    # running as if the request had succeeded. (HTTPException and other handled
    # exceptions become ordinary responses further in, so their tasks do run.)
    middleware=[Middleware(trio_bg.BackgroundTaskMiddleware, grace_period=5.0)],
)
