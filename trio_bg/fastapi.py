"""FastAPI integration: a typed dependency for the request's `trio_bg.BackgroundTasks`.

FastAPI runs on trio through AnyIO (serve it with Hypercorn's trio worker)::

    from trio_bg.fastapi import Tasks

    app = FastAPI()
    trio_bg.fastapi.install(app, grace_period=10.0)

    @app.post("/signup")
    async def signup(address: str, tasks: Tasks) -> dict[str, str]:
        tasks.add_task(send_welcome_email, address)
        return {"status": "welcome"}

FastAPI's own ``BackgroundTasks`` parameter keeps working as before (its tasks run
inline, after the response, inside the request); only ``Tasks`` uses trio_bg.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from ._tasks import BackgroundTasks, current_tasks
from .starlette import install, middleware_of, overloaded_handler

__all__ = ["Tasks", "install", "middleware_of", "overloaded_handler", "request_tasks"]


async def request_tasks() -> BackgroundTasks:
    """FastAPI dependency: the `trio_bg.BackgroundTasks` of the request being handled.

    An ``async def`` on purpose: FastAPI would run a plain function dependency (such
    as `trio_bg.current_tasks` itself) in a worker thread, one per request.
    """
    return current_tasks()


Tasks = Annotated[BackgroundTasks, Depends(request_tasks)]
"""Declare ``tasks: Tasks`` in an endpoint (or a dependency) to get the request's
`trio_bg.BackgroundTasks`; its tasks run in the server's nursery after the response."""
