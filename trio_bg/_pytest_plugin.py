"""trio_bg's pytest plugin, registered through the ``pytest11`` entry point.

Fixtures (they need pytest-trio):

- ``trio_bg_client``: an open `trio_bg.testing.TestClient` for the app that the
  ``trio_bg_app`` fixture returns. A background task that fails fails the test.
- ``trio_bg_app``: define it in your conftest.py, returning your ASGI app (wrapped in
  `trio_bg.BackgroundTaskMiddleware`, or containing it).

Mark a test ``@pytest.mark.trio_bg(raise_task_errors=False)`` to inspect failures in
``trio_bg_client.task_errors`` instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .testing import TestClient


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "trio_bg(**options): options for open_test_client() in the trio_bg_client fixture, "
        "e.g. raise_task_errors=False",
    )


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
