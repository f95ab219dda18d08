"""A Quart-Trio app whose background tasks run through trio_bg.

Run it from the repository root with Hypercorn's trio worker::

    hypercorn --worker-class trio examples.quart_trio_app:app

then ``curl -X POST 'http://127.0.0.1:8000/signup?email=ada@example.com'`` and stop the
server with Ctrl+C. With Quart-Trio's own ``add_background_task`` the 3-second task
would be cancelled the moment the server shuts down; through trio_bg it is given the
grace period (10 s) to finish, then ``after_serving`` runs.

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


@app.get("/stats")
async def stats() -> dict[str, int]:
    current = middleware.nursery.stats
    return {"running": current.running, "pending": current.pending, "failed": current.failed}


@app.after_serving
async def close_resources() -> None:
    logger.info("after_serving: the background tasks are done; closing resources")
