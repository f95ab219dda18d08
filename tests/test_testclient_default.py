"""Under pytest, Starlette's and FastAPI's own ``TestClient`` runs an app that has trio_bg
installed on trio, as production does (issue 19, item 3): trio_bg's pytest plugin
changes the default ``backend`` for those apps only, while its session is configured.

The tests are plain ``def`` functions, as with Starlette's client; each endpoint says
which event loop served it.
"""

from __future__ import annotations

import sys
from typing import Any

import fastapi
import fastapi.testclient
import pytest
import sniffio
import starlette.testclient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import trio_bg
import trio_bg.fastapi
import trio_bg.starlette
from trio_bg._web.middleware import ASGIApp, Receive, Scope, Send


class Loops:
    """The event loop of each request, and of each background task, in order."""

    def __init__(self) -> None:
        self.tasks: list[str] = []

    async def task(self) -> None:
        self.tasks.append(sniffio.current_async_library())

    async def endpoint(self, request: Request) -> Response:
        trio_bg.current_tasks().add_task(self.task)
        return PlainTextResponse(sniffio.current_async_library())


def starlette_app(loops: Loops) -> Starlette:
    app = Starlette(routes=[Route("/", loops.endpoint)])
    trio_bg.starlette.install(app)
    return app


def fastapi_app(loops: Loops) -> fastapi.FastAPI:
    app = fastapi.FastAPI()
    trio_bg.fastapi.install(app)

    @app.get("/")
    async def where(tasks: fastapi.BackgroundTasks) -> Response:  # FastAPI's own, adopted
        tasks.add_task(loops.task)
        return PlainTextResponse(sniffio.current_async_library())

    return app


class Outer:
    """Some other ASGI middleware around the app, keeping it as ``.app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def wrapped_in_outer(loops: Loops) -> Outer:
    return Outer(Outer(starlette_app(loops)))


def middleware_around(loops: Loops) -> trio_bg.BackgroundTaskMiddleware:
    return trio_bg.BackgroundTaskMiddleware(Starlette(routes=[Route("/", loops.endpoint)]))


def report_of(app: Any) -> trio_bg.ShutdownReport:
    while not isinstance(app, trio_bg.BackgroundTaskMiddleware | Starlette):
        app = app.app
    if isinstance(app, trio_bg.BackgroundTaskMiddleware):
        return app.report
    return trio_bg.starlette.middleware_of(app).report


APPS = pytest.mark.parametrize(
    "make_app", [starlette_app, fastapi_app, middleware_around, wrapped_in_outer]
)


@APPS
@pytest.mark.parametrize(
    "client_class",
    [starlette.testclient.TestClient, fastapi.testclient.TestClient],
    ids=["starlette", "fastapi"],
)
def test_with_the_lifespan_an_app_with_trio_bg_runs_on_trio(
    make_app: Any, client_class: type[starlette.testclient.TestClient]
) -> None:
    loops = Loops()
    app = make_app(loops)
    with client_class(app) as client:
        assert client.get("/").text == "trio"
        assert client.get("/").text == "trio"
    assert loops.tasks == ["trio", "trio"]
    report = report_of(app)
    assert (report.accepted, report.completed) == (2, 2)  # in the nursery, drained


@APPS
def test_without_the_lifespan_too(make_app: Any) -> None:
    loops = Loops()
    client = starlette.testclient.TestClient(make_app(loops))
    assert client.get("/").text == "trio"
    assert loops.tasks == ["trio"]  # inline, after the response


def test_an_app_without_trio_bg_keeps_asyncio() -> None:
    async def where(request: Request) -> Response:
        return PlainTextResponse(sniffio.current_async_library())

    app = Starlette(routes=[Route("/", where)])
    with starlette.testclient.TestClient(app) as client:
        assert client.get("/").text == "asyncio"


def test_an_explicit_backend_is_kept() -> None:
    loops = Loops()
    client = starlette.testclient.TestClient(starlette_app(loops), backend="asyncio")
    assert client.get("/").text == "asyncio"
    # Options without a backend are asyncio's: they stay with it.
    options: dict[str, Any] = {"use_uvloop": False}
    client = starlette.testclient.TestClient(starlette_app(loops), backend_options=options)
    assert client.get("/").text == "asyncio"


def test_an_explicit_asyncio_backend_is_still_refused_at_startup() -> None:
    app = fastapi_app(Loops())
    with (
        pytest.raises(RuntimeError, match=r"runs on trio.*hypercorn --worker-class trio"),
        fastapi.testclient.TestClient(app, backend="asyncio"),
    ):
        pass


INNER_TEST = """
    import sniffio
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    import trio_bg.starlette


    async def where(request):
        return PlainTextResponse(sniffio.current_async_library())


    def test_the_default_backend():
        app = Starlette(routes=[Route("/", where)])
        trio_bg.starlette.install(app)
        assert TestClient(app).get("/").text == {expected!r}
"""


def test_the_ini_option_turns_it_off_for_its_session(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_bg_testclient_on_trio = false\n")
    pytester.makepyfile(INNER_TEST.format(expected="asyncio"))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    # The inner session (in this process) has ended: this session's default is back.
    assert starlette.testclient.TestClient(starlette_app(Loops())).get("/").text == "trio"


def test_a_pytest_session_sets_the_default_up_and_undoes_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_TEST.format(expected="trio"))
    pytester.makepyfile(
        run_pytest="""
        import pytest
        from starlette.testclient import TestClient

        original = TestClient.__init__
        assert pytest.main(["-q", "-p", "no:cacheprovider", "test_inner.py"]) == 0
        assert TestClient.__init__ is original, "the session left TestClient patched"
        """
    )
    result = pytester.run(sys.executable, "run_pytest.py")
    assert result.ret == 0, str(result.stdout) + str(result.stderr)
