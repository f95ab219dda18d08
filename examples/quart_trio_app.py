"""A Quart-Trio app whose background tasks run through trio_bg.

Run it from the repository root with Hypercorn's trio worker::

    hypercorn --worker-class trio examples.quart_trio_app:app

then ``curl -X POST 'http://127.0.0.1:8000/signup?email=ada@example.com'`` and stop the
server with Ctrl+C. With Quart-Trio's own ``add_background_task`` the 3-second task would
be cancelled the moment the server shuts down; through trio_bg it is given the grace
period (10 s) to finish, then ``after_serving`` runs. ``curl -i -X POST
http://127.0.0.1:8000/exports`` answers ``202 Accepted`` with a ``Location``:
``/tasks/{id}``, the export's status as JSON.

Quart's own test tooling works unchanged (``tests/test_quart_test_app.py`` does this)::

    async with app.test_app() as test_app:  # shuts down within the grace period
        await test_app.test_client().post("/signup?email=ada@example.com")
        await test_app.drain()  # the e-mail task has ended; a failure is raised here
"""

from __future__ import annotations

import logging

import trio
from quart import current_app, request
from quart_trio import QuartTrio

import trio_bg
import trio_bg.quart_trio
from examples._logging import show_logs

logger = logging.getLogger("examples.quart_trio_app")

show_logs(__name__)

app = QuartTrio(__name__)
app.config["WELCOME_FROM"] = "team@example.com"
# Wraps app.asgi_app in trio_bg's middleware and makes app.add_background_task use it.
middleware = trio_bg.quart_trio.init_app(app, grace_period=10.0)


async def send_welcome_email(email: str) -> None:
    """Runs after the response, in a fresh app context (``current_app`` works)."""
    sender = current_app.config["WELCOME_FROM"]
    await trio.sleep(3)  # stands in for a slow SMTP server
    logger.info("sent a welcome e-mail to %s from %s", email, sender)


@app.post("/signup")
async def signup() -> dict[str, str]:
    email = request.args.get("email", "someone@example.com")
    app.add_background_task(send_welcome_email, email)  # unchanged Quart-Trio code
    return {"status": "welcome", "email": email}


@trio_bg.task(name="exports.build")
async def build_export(rows: int) -> dict[str, int]:
    """A task a client waits for: its progress and result show in its status."""
    for done in range(0, rows, 100):
        trio_bg.set_progress(done / rows, f"{done} of {rows} rows")
        await trio.sleep(0.1)  # stands in for the work
    return {"rows": rows}


@app.post("/exports")
async def start_export() -> tuple[dict[str, str], int, dict[str, str]]:
    """The 202 pattern: answer at once, with where to look."""
    handle = trio_bg.quart_trio.add_background_task(build_export, 500)
    return {"id": handle.id}, 202, {"Location": f"/tasks/{handle.id}"}


@app.get("/tasks/<task_id>")
async def task_status(task_id: str) -> tuple[dict[str, object], int]:
    """A task's status as JSON (in a real app, check who asks: it shows results)."""
    status = await trio_bg.task_status(task_id)
    if status is None:
        return {"error": "no task has this id"}, 404
    return status.as_dict(), 200


@app.get("/stats")
async def stats() -> dict[str, int]:
    current = middleware.nursery.stats
    return {"running": current.running, "pending": current.pending, "failed": current.failed}


@app.after_serving
async def close_resources() -> None:
    logger.info("after_serving: the background tasks are done; closing resources")
