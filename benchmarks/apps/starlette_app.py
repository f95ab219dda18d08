"""A Starlette app: ``Response(background=...)`` (the anchor), or trio_bg's middleware."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import trio_bg

from .counting import BODY, COUNT_PATH, COUNTS, LOAD_PATH, TASKS, ASGIApp


def build(task: str, *, middleware: bool) -> ASGIApp:
    """Each request adds ``TASKS[task]``: with ``middleware`` through trio_bg, else as
    Starlette's own background task (run inline, after the body, in the same call)."""
    func = TASKS[task]

    async def index(request: Request) -> Response:
        background = None
        if middleware:
            trio_bg.current_tasks().add_task(func)
        else:
            background = BackgroundTask(func)
        COUNTS.request(with_task=True)
        return Response(BODY, media_type="text/plain", background=background)

    async def count(request: Request) -> Response:
        return Response(COUNTS.as_json(), media_type="application/json")

    app = Starlette(routes=[Route(LOAD_PATH, index), Route(COUNT_PATH, count)])
    return COUNTS.watched(trio_bg.BackgroundTaskMiddleware(app)) if middleware else app
