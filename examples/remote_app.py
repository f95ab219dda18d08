"""A Starlette app that hands some of its background work to streaq workers over Redis,
and keeps the rest in its own nursery.

Needs ``pip install "trio-bg[streaq,starlette]"`` and a Redis 7 (``$REDIS_URL``, by
default ``redis://127.0.0.1:6379``). From the repository root, in two terminals::

    python -m trio_bg serve examples.remote_app:app
    python -m trio_bg worker examples.remote_app:worker

then ``curl -X POST 'http://127.0.0.1:8000/signup?user_id=42'``. The answer comes once
Redis has the welcome e-mail task (a 503 if it cannot take it); a worker sends it. The
audit line is written by the web process itself, after the response. Start more workers,
on any machine that can reach Redis: each task runs at least once.
"""

from __future__ import annotations

import logging
import os

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import trio_bg
import trio_bg.starlette
import trio_bg.streaq
from examples._logging import show_logs

logger = logging.getLogger("examples.remote_app")
show_logs("examples.remote_app", "streaq")

worker = trio_bg.streaq.worker(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
"""The web process hands tasks to it; ``python -m trio_bg worker`` runs them."""

sent: set[int] = set()  # (a worker's own memory: a real app asks its database)


@worker.task(name="emails.welcome", timeout=30)
async def send_welcome(user_id: int) -> None:
    """Runs on a worker, on trio. At least once: a worker killed mid-task leaves it to
    another, so it checks that the e-mail has not gone out already."""
    if user_id in sent:
        return
    await trio.sleep(0.2)  # the SMTP conversation
    sent.add(user_id)
    logger.info("welcome e-mail sent to user %d", user_id)


async def audit(event: str, user_id: int) -> None:
    """Runs in the web process, in trio_bg's nursery, after the response."""
    logger.info("audit: %s by user %d", event, user_id)


async def signup(request: Request) -> PlainTextResponse:
    user_id = int(request.query_params["user_id"])
    tasks = trio_bg.current_tasks()
    tasks.add_task(send_welcome, user_id)  # to Redis, before the body goes out
    tasks.add_task(audit, "signup", user_id)  # here
    return PlainTextResponse(f"welcome, user {user_id}\n")


app = Starlette(routes=[Route("/signup", signup, methods=["POST"])])
trio_bg.starlette.install(app, streaq=worker)
