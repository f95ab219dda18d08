"""The raw trio_bg app of the HTTP overhead benchmark (one no-op task per request), with
or without `trio_bg.metrics.app` mounted at ``/metrics`` (the metrics benchmark)."""

from __future__ import annotations

import trio_bg
import trio_bg.metrics

from .counting import BODY, COUNT_PATH, COUNTS, HEADERS, ASGIApp, Receive, Scope, Send, noop_task

METRICS_PATH = "/metrics"


def build(metrics: bool) -> ASGIApp:
    """``GET /`` adds a no-op task; ``GET /count`` the counts; with ``metrics``, ``GET
    /metrics`` answers the metrics (404 without)."""
    scrape = trio_bg.metrics.app() if metrics else None

    async def respond(send: Send, status: int, body: bytes) -> None:
        headers = HEADERS if body == BODY else [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # the middleware answers the lifespan
        path = scope["path"]
        if path == COUNT_PATH:
            await respond(send, 200, COUNTS.as_json())
        elif path == METRICS_PATH:
            if scrape is None:
                await respond(send, 404, b"")
            else:
                await scrape(scope, receive, send)
        else:
            trio_bg.current_tasks().add_task(noop_task)
            COUNTS.request(with_task=True)
            await respond(send, 200, BODY)

    return COUNTS.watched(trio_bg.BackgroundTaskMiddleware(app))
