"""trio_bg's pytest plugin, registered through the ``pytest11`` entry point.

Fixtures (they need pytest-trio):

- ``trio_bg_client``: an open `trio_bg.testing.TestClient` for the app that the
  ``trio_bg_app`` fixture returns. A background task that fails fails the test.
- ``trio_bg_app``: define it in your conftest.py, returning your ASGI app (wrapped in
  `trio_bg.BackgroundTaskMiddleware`, or containing it).

Mark a test ``@pytest.mark.trio_bg(raise_task_errors=False)`` to inspect failures in
``trio_bg_client.task_errors`` instead.

While the plugin is active, Starlette's (and so FastAPI's) ``TestClient``, made with
no ``backend`` (nor ``backend_options``) for an app that has trio_bg installed, runs
the app on trio, as production does; ``trio_bg_testclient_on_trio = false`` in the
ini file turns that off.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .testing import TestClient

TESTCLIENT_INI = "trio_bg_testclient_on_trio"

_APP_CHAIN_LIMIT = 32
"""How many ``.app`` links `_has_trio_bg` follows (a cycle must not hang it)."""

_on_trio: list[bool] = []
"""The ini setting of each configured pytest session, innermost last (pytester runs
sessions inside a session, in the same process)."""

_original_init: Callable[..., None] | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        TESTCLIENT_INI,
        "run Starlette's and FastAPI's TestClient on trio when no backend is given and "
        "the app has trio_bg installed (default: true)",
        type="bool",
        default=True,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "trio_bg(**options): options for open_test_client() in the trio_bg_client fixture, "
        "e.g. raise_task_errors=False",
    )
    _on_trio.append(bool(config.getini(TESTCLIENT_INI)))
    if len(_on_trio) == 1:
        _patch_testclient()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _on_trio:
        _on_trio.pop()
    if not _on_trio:
        _restore_testclient()


def _patch_testclient() -> None:
    """Make ``starlette.testclient.TestClient`` default to trio for trio_bg's apps."""
    global _original_init
    try:
        from starlette.testclient import TestClient as StarletteTestClient
    except (ImportError, RuntimeError):  # no Starlette, or no httpx for its client
        return
    init = StarletteTestClient.__init__
    parameters = list(inspect.signature(init).parameters)
    if "backend" not in parameters:  # not the Starlette this was written for
        return
    backend_at = parameters.index("backend") - 1  # its index in args, after self

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if (
            _on_trio[-1]
            and len(args) <= backend_at
            and "backend" not in kwargs
            # Options without a backend are asyncio's (trio's would need backend="trio").
            and kwargs.get("backend_options") is None
            and _has_trio_bg(args[0] if args else kwargs.get("app"))
        ):
            kwargs["backend"] = "trio"
        init(self, *args, **kwargs)

    _original_init = init
    StarletteTestClient.__init__ = __init__  # type: ignore[method-assign]


def _restore_testclient() -> None:
    global _original_init
    if _original_init is not None:
        from starlette.testclient import TestClient as StarletteTestClient

        StarletteTestClient.__init__ = _original_init  # type: ignore[method-assign]
        _original_init = None


def _has_trio_bg(app: object) -> bool:
    """Whether ``app`` has trio_bg installed: it is a `BackgroundTaskMiddleware`, a
    Starlette (or FastAPI) app lists one in ``user_middleware`` (its stack is only
    built when it first runs), or a middleware's ``.app`` leads to one of those."""
    from ._web.middleware import BackgroundTaskMiddleware

    for _ in range(_APP_CHAIN_LIMIT):
        if isinstance(app, BackgroundTaskMiddleware):
            return True
        middleware = getattr(app, "user_middleware", None)
        if isinstance(middleware, list) and any(
            isinstance(cls := getattr(entry, "cls", None), type)
            and issubclass(cls, BackgroundTaskMiddleware)
            for entry in middleware
        ):
            return True
        app = getattr(app, "app", None)
        if app is None:
            return False
    return False


@pytest.fixture
def trio_bg_app() -> Any:
    """The app under test: override this fixture to use ``trio_bg_client``."""
    pytest.fail("trio_bg_client needs a fixture named trio_bg_app that returns your ASGI app")


@pytest.fixture
async def trio_bg_client(
    request: pytest.FixtureRequest, trio_bg_app: Any
) -> AsyncIterator[TestClient]:
    """A `trio_bg.testing.TestClient` for ``trio_bg_app``, with its lifespan running."""
    # Imported here so that installing trio_bg never breaks an unrelated pytest run
    # that lacks httpx: the plugin loads everywhere, the client only when asked for.
    from .testing import open_test_client

    marker = request.node.get_closest_marker("trio_bg")
    async with open_test_client(trio_bg_app, **(marker.kwargs if marker else {})) as client:
        yield client
