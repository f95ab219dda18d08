"""A raw ASGI app (no framework) whose requests start background work with trio_bg.

Run it from the repository root with Hypercorn's trio worker::

    hypercorn --worker-class trio examples.raw_asgi:app

then ``curl 'http://127.0.0.1:8000/?name=ada'``. The response comes back at once; the
log shows the two background tasks running after it. Stop the server with Ctrl+C (or
SIGTERM to Hypercorn): the log shows the tasks still running being drained, the
report of every task, and only then the app's own shutdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio

import trio_bg
from examples._logging import show_logs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("examples.raw_asgi")

show_logs(__name__)


async def send_welcome_email(name: str) -> None:
    """An ``async def`` task: runs as a trio task in the middleware's nursery."""
    logger.info("sending a welcome e-mail to %s", name)
    await trio.sleep(1)  # stands in for talking to an SMTP server
    logger.info("sent a welcome e-mail to %s", name)


def write_audit_record(name: str) -> None:
    """A plain function: blocking code is fine, it runs in a worker thread."""
    logger.info("writing the audit record for %s", name)
    time.sleep(0.5)  # stands in for a blocking client library
    logger.info("wrote the audit record for %s", name)


async def app_without_tasks(scope: Scope, receive: Receive, send: Send) -> None:
    """The app itself. It knows nothing of the server; the middleware gives each
    request a `trio_bg.BackgroundTasks`, run once the response has been sent."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        # Raising is how an ASGI app declines a connection type it does not serve
        # (Hypercorn then closes the WebSocket handshake).
        raise NotImplementedError(f"this example serves no {scope['type']} connections")

    query = parse_qs(scope["query_string"].decode("latin-1"))
    name = query.get("name", ["world"])[0]

    # Two ways to get the same per-request collection: the context variable (works
    # anywhere the request's code runs, including sync code in worker threads)...
    tasks = trio_bg.current_tasks()
    # ... and the scope key, for code that already passes the scope around.
    assert scope["trio_bg.tasks"] is tasks

    tasks.add_task(send_welcome_email, name)  # an async function and its arguments,
    tasks.add_task(write_audit_record, name=name)  # a plain one, keyword arguments too

    body = f"Hello, {name}! Your e-mail is on its way.\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    # Once this final body message has gone to the server, the tasks start.
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    """The app's own startup and shutdown.

    The middleware needs the lifespan for itself (it opens its nursery at startup
    and drains it at shutdown) and forwards the events to the wrapped app. An app
    with nothing to set up could raise here instead (the ASGI way to say "no
    lifespan"; the middleware then serves it without), but *returning* would be
    wrong: it reads as a lifespan handler that ended before startup. Answering the
    two events costs a few lines, and shows the order: the background tasks have
    been drained by the time the app's shutdown runs, so it may close whatever
    they use (a database pool, an HTTP client).
    """
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            logger.info("app startup")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            logger.info("app shutdown (the background tasks have been drained)")
            await send({"type": "lifespan.shutdown.complete"})
            return


# What Hypercorn serves. grace_period: how long a shutdown waits for running tasks
# before it cancels them (and names them in the report).
app = trio_bg.BackgroundTaskMiddleware(app_without_tasks, grace_period=5.0)
