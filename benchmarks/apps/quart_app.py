"""A Quart-Trio app: ``app.add_background_task`` (the anchor), or trio_bg's middleware."""

from __future__ import annotations

from typing import Any, cast

from quart import Response
from quart_trio import QuartTrio

import trio_bg

from .counting import BODY, CONTENT_TYPE, COUNT_PATH, COUNTS, LOAD_PATH, TASKS, ASGIApp


def build(task: str, *, middleware: bool) -> ASGIApp:
    """Each request adds ``TASKS[task]``: with ``middleware`` through trio_bg, else with
    Quart-Trio's ``add_background_task`` (started at once in the app's nursery)."""
    func = TASKS[task]
    app = QuartTrio(__name__)

    @app.route(LOAD_PATH)
    async def index() -> Response:
        if middleware:
            trio_bg.current_tasks().add_task(func)
        else:
            app.add_background_task(func)
        COUNTS.request(with_task=True)
        return Response(BODY, content_type=CONTENT_TYPE)

    @app.route(COUNT_PATH)
    async def count() -> Response:
        return Response(COUNTS.as_json(), content_type="application/json")

    if middleware:  # the way Quart documents wrapping its app in ASGI middleware
        wrapped = COUNTS.watched(trio_bg.BackgroundTaskMiddleware(cast(ASGIApp, app.asgi_app)))
        app.asgi_app = cast(Any, wrapped)  # type: ignore[method-assign]
    return cast(ASGIApp, app)  # Quart types ASGI messages more narrowly than trio_bg
