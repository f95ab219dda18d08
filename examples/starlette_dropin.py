"""Moving a Starlette app's ``BackgroundTasks`` to trio_bg: change the import, install
the middleware.

Before -- Starlette runs the tasks inline, one after another, inside the request's
ASGI call; the first error skips the rest, and a redeploy cuts them off::

    from starlette.background import BackgroundTasks

    async def order(request):
        tasks = BackgroundTasks()
        tasks.add_task(send_receipt, order_id)
        tasks.add_task(notify_warehouse, order_id)
        return JSONResponse({"order": order_id}, background=tasks)

After -- the same code, importing ``BackgroundTasks`` from trio_bg (see ``order``
below): the tasks run concurrently in the server's nursery once the response is
complete, a failing one skips nothing, and a graceful shutdown drains them for the grace
period. Made in a request, ``BackgroundTasks()`` is that request's collection (the same
object as ``trio_bg.current_tasks()``); passing it as ``background`` is optional.

Run it from the repository root with Hypercorn's trio worker::

    hypercorn --worker-class trio examples.starlette_dropin:app

then ``curl -X POST http://127.0.0.1:8000/orders/42`` and stop the server with Ctrl+C:
the log shows the tasks drained before the app's own shutdown.

Tests change one import too (``tests/test_starlette_testclient.py`` does this)::

    from trio_bg.starlette import TestClient  # was: from starlette.testclient import ...

    with TestClient(app) as client:  # the lifespan: the real nursery, on trio
        client.post("/orders/42")
        # both tasks have ended here; had one failed, post() would have raised it
"""

from __future__ import annotations

import logging
import time

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import trio_bg.starlette
from examples._logging import show_logs
from trio_bg import BackgroundTasks  # was: from starlette.background import BackgroundTasks

logger = logging.getLogger("examples.starlette_dropin")

show_logs(__name__)


async def send_receipt(order_id: int) -> None:
    """An ``async def`` task: a trio task in the server's nursery."""
    await trio.sleep(1)  # stands in for an e-mail
    logger.info("sent the receipt for order %d", order_id)


def notify_warehouse(order_id: int) -> None:
    """A plain function task: one of trio_bg's worker threads (its own limiter)."""
    time.sleep(0.5)  # stands in for a blocking client library
    logger.info("told the warehouse about order %d", order_id)


async def order(request: Request) -> JSONResponse:
    order_id = int(request.path_params["order_id"])
    tasks = BackgroundTasks()
    tasks.add_task(send_receipt, order_id)
    tasks.add_task(notify_warehouse, order_id)
    # Passing it as `background` keeps the code's shape, and is optional: the middleware
    # hands the tasks over when the response completes anyway. Starlette annotates
    # `background` as its own BackgroundTask, hence the ignore; with a type checker,
    # write background=BackgroundTask(tasks) or leave the argument out.
    return JSONResponse({"order": order_id}, background=tasks)  # type: ignore[arg-type]


app = Starlette(routes=[Route("/orders/{order_id:int}", order, methods=["POST"])])
# The middleware goes into the app's own stack, inside Starlette's error handling, and
# Overloaded becomes a 503. Call it after adding your own middleware.
trio_bg.starlette.install(app, grace_period=10.0)
