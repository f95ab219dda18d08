"""FastAPI's background-task tutorials (ported, with their own tests, to
``tests/upstream/from_fastapi``), served the way trio_bg is meant to run: under a real
Hypercorn, and under Starlette's ``TestClient`` on trio with the lifespan. The tasks
run in the nursery, and write the log FastAPI's own tests expect.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import trio
from conftest import served
from fastapi import FastAPI
from fastapi.testclient import TestClient

import trio_bg.fastapi

BOUND = 10.0
"""Seconds the whole served run may take before the test fails."""

TUTORIALS = Path(__file__).parent / "upstream" / "from_fastapi" / "docs_src" / "background_tasks"

CASES = [  # tutorial, request, the log its tasks write, how many tasks
    (
        "tutorial001_py310",
        "/send-notification/foo@example.com",
        "notification for foo@example.com: some notification",
        1,
    ),
    *(
        (
            name,
            "/send-notification/foo@example.com?q=some-query",
            "found query: some-query\nmessage to foo@example.com\n",  # ordered=True
            2,
        )
        for name in ("tutorial002_py310", "tutorial002_an_py310")
    ),
]


def fresh_app(name: str) -> FastAPI:
    """A new copy of a tutorial's app: its module's own ``app`` belongs to the ported
    tests, which serve it without a lifespan (a middleware runs one lifespan at most)."""
    spec = importlib.util.spec_from_file_location(f"fresh_{name}", TUTORIALS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app: FastAPI = module.app
    return app


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the tutorials write log.txt in the working directory


@pytest.mark.parametrize(("name", "url", "log", "tasks"), CASES)
async def test_under_hypercorn(name: str, url: str, log: str, tasks: int) -> None:
    app = fresh_app(name)
    with trio.fail_after(BOUND):
        async with served(app) as client:
            assert (await client.post(url)).status_code == 200
    # The server's shutdown drained the nursery before it returned.
    assert await trio.Path("log.txt").read_text() == log
    report = trio_bg.fastapi.middleware_of(app).report
    assert (report.accepted, report.completed) == (tasks, tasks)


@pytest.mark.parametrize(("name", "url", "log", "tasks"), CASES)
def test_with_test_client_on_trio(name: str, url: str, log: str, tasks: int) -> None:
    """A test suite that runs the lifespan (``with TestClient(app)``) picks trio and
    reads the tasks' effects after the block, whose shutdown drained them."""
    app = fresh_app(name)
    with TestClient(app, backend="trio") as client:
        assert client.post(url).status_code == 200
    assert Path("log.txt").read_text() == log
    assert trio_bg.fastapi.middleware_of(app).report.completed == tasks


@pytest.mark.parametrize(("name", "url", "log", "tasks"), CASES)
def test_with_trio_bgs_test_client(name: str, url: str, log: str, tasks: int) -> None:
    """``trio_bg.fastapi.TestClient`` waits for the tasks after each request, so a test
    written for FastAPI's inline tasks keeps its assertions where they were."""
    app = fresh_app(name)
    with trio_bg.fastapi.TestClient(app) as client:
        assert client.post(url).status_code == 200
        assert Path("log.txt").read_text() == log
        assert client.stats.completed == tasks
