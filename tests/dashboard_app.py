"""The app the dashboard's browser tests serve (``python -m trio_bg serve
dashboard_app:app --journal ...``): a Starlette app with the dashboard mounted at
``/dashboard`` (Starlette's Mount: the path keeps its prefix), for staff only.

``GET /login`` sets the staff cookie the dashboard's ``authorize`` asks for. ``POST
/add?kind=K&name=N`` adds a task: ``hold`` (reports its progress, then waits until
cancelled), ``quick`` (completes), ``fail`` (raises), or ``charge`` (durable: it fails,
becoming a dead letter, until the file ``$TRIO_BG_TEST_GATE`` exists). The answer is
the task's id.
"""

from __future__ import annotations

import os

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import trio_bg
import trio_bg.dashboard
from trio_bg._web.asgi import Scope

STAFF = "staff-only-cookie"


async def hold(name: str) -> None:
    trio_bg.set_progress(0.4, f"{name}: 4 of 10 pages")
    await trio.sleep_forever()


async def quick(name: str) -> None:
    await trio.sleep(0.01)


async def fail(name: str) -> None:
    raise ValueError(f"card declined for {name}")


@trio_bg.task(name="tests.dashboard_app.charge", durable=True)
def charge(name: str) -> None:  # (a plain function: it runs in a worker thread)
    if not os.path.exists(os.environ["TRIO_BG_TEST_GATE"]):
        raise ConnectionError("the payment provider is down")


KINDS = {"hold": hold, "quick": quick, "fail": fail, "charge": charge}


def staff_only(scope: Scope) -> bool:
    cookies = dict(scope["headers"]).get(b"cookie", b"").decode("latin-1")
    return f"staff={STAFF}" in [part.strip() for part in cookies.split(";")]


async def login(request: Request) -> PlainTextResponse:
    response = PlainTextResponse("welcome, staff")
    response.set_cookie("staff", STAFF, httponly=True, samesite="strict")
    return response


async def add(request: Request) -> PlainTextResponse:
    func = KINDS[request.query_params["kind"]]
    handle = trio_bg.current_tasks().add_task(func, request.query_params.get("name", "x"))
    return PlainTextResponse(handle.id, status_code=202)


app = Starlette(
    routes=[
        Route("/login", login),
        Route("/add", add, methods=["POST"]),
        Mount("/dashboard", app=trio_bg.dashboard.app(authorize=staff_only)),
    ]
)
