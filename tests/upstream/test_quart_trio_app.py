# Ported from Quart-Trio, tests/test_app.py, tests/test_basic.py and tests/test_sync.py
# (pgjones/quart-trio, commit e5bfd9b7), Copyright P G Jones 2018. MIT licence: see
# https://github.com/pgjones/quart-trio/blob/main/LICENSE
#
# What changed: every app gets trio_bg.quart_trio.init_app (its ASGI app wrapped in
# trio_bg's middleware, `add_background_task` and `test_app()` replaced); the
# Python < 3.11 import of exceptiongroup and the send_file test (no ASGI involved) are
# left out. The test bodies are Quart-Trio's: its test client, with and without
# `test_app()`, works unchanged.
"""Quart-Trio's own app tests, with trio_bg.quart_trio.init_app."""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import NoReturn

import pytest
from quart import ResponseReturnValue, abort, request, websocket
from quart.testing import WebsocketResponseError
from quart_trio import QuartTrio as _QuartTrio

import trio_bg.quart_trio


def QuartTrio(import_name: str) -> _QuartTrio:
    """Stands in for the class in the tests below: a QuartTrio app with trio_bg."""
    app = _QuartTrio(import_name)
    trio_bg.quart_trio.init_app(app)
    return app


# -- tests/test_app.py -------------------------------------------------------------


@pytest.fixture(name="error_app", scope="function")
def _error_app() -> _QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/")
    async def index() -> NoReturn:
        raise BaseExceptionGroup(
            "msg1", [ValueError(), BaseExceptionGroup("msg2", [TypeError(), ValueError()])]
        )

    @app.websocket("/ws/")
    async def ws() -> NoReturn:
        raise BaseExceptionGroup(
            "msg3", [ValueError(), BaseExceptionGroup("msg4", [TypeError(), ValueError()])]
        )

    return app


@pytest.mark.trio
async def test_exception_group_handling(error_app: _QuartTrio) -> None:
    @error_app.errorhandler(TypeError)
    async def handler(_: Exception) -> ResponseReturnValue:
        return "", 201

    test_client = error_app.test_client()
    response = await test_client.get("/")
    assert response.status_code == 201


@pytest.mark.trio
async def test_websocket_exception_group_handling(error_app: _QuartTrio) -> None:
    @error_app.errorhandler(TypeError)
    async def handler(_: Exception) -> ResponseReturnValue:
        return "", 201

    test_client = error_app.test_client()
    try:
        async with test_client.websocket("/ws/") as test_websocket:
            await test_websocket.receive()
    except BaseExceptionGroup as error:
        for exception in error.exceptions:
            if isinstance(exception, WebsocketResponseError):
                assert exception.response.status_code == 201


@pytest.mark.trio
async def test_exception_group_unhandled(error_app: _QuartTrio) -> None:
    test_client = error_app.test_client()
    response = await test_client.get("/")
    assert response.status_code == 500


@pytest.mark.trio
async def test_websocket_exception_group_unhandled(error_app: _QuartTrio) -> None:
    test_client = error_app.test_client()
    try:
        async with test_client.websocket("/ws/") as test_websocket:
            await test_websocket.receive()
    except BaseExceptionGroup as error:
        for exception in error.exceptions:
            if isinstance(exception, WebsocketResponseError):
                assert exception.response.status_code == 500


@pytest.mark.trio
async def test_test_app() -> None:
    startup = False
    shutdown = False

    app = QuartTrio(__name__)

    @app.before_serving
    async def before() -> None:
        nonlocal startup
        startup = True

    @app.after_serving
    async def after() -> None:
        nonlocal shutdown
        shutdown = True

    @app.route("/")
    async def index() -> str:
        return ""

    async with app.test_app() as test_app:
        assert startup
        assert app.nursery is not None
        test_client = test_app.test_client()
        await test_client.get("/")
        assert not shutdown
    assert shutdown


# -- tests/test_basic.py -----------------------------------------------------------


@pytest.fixture
def app() -> _QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/")
    async def index() -> ResponseReturnValue:
        return "index"

    @app.websocket("/ws/")
    async def ws() -> None:
        # async for message in websocket:
        while True:
            message = await websocket.receive()
            await websocket.send(message)

    @app.websocket("/ws/abort/")
    async def ws_abort() -> None:
        abort(401)

    return app


@pytest.mark.trio
async def test_index(app: _QuartTrio) -> None:
    test_client = app.test_client()
    response = await test_client.get("/")
    assert response.status_code == 200
    assert b"index" in (await response.get_data())


@pytest.mark.trio
async def test_websocket(app: _QuartTrio) -> None:
    test_client = app.test_client()
    data = b"bob"
    async with test_client.websocket("/ws/") as test_websocket:
        await test_websocket.send(data)
        result = await test_websocket.receive()
    assert result == data


@pytest.mark.trio
async def test_websocket_abort(app: _QuartTrio) -> None:
    test_client = app.test_client()
    try:
        async with test_client.websocket("/ws/abort/") as test_websocket:
            await test_websocket.receive()
    except BaseExceptionGroup as error:
        for exception in error.exceptions:
            if isinstance(exception, WebsocketResponseError):
                assert exception.response.status_code == 401


# -- tests/test_sync.py ------------------------------------------------------------


@pytest.fixture(name="sync_app")
def _sync_app() -> _QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/", methods=["GET", "POST"])
    def index() -> ResponseReturnValue:
        return request.method

    @app.route("/gen")
    def gen() -> ResponseReturnValue:
        def _gen() -> Generator[bytes, None, None]:
            yield b"%d" % threading.current_thread().ident  # type: ignore[str-bytes-safe]
            for _ in range(2):
                yield b"b"

        return _gen(), 200

    return app


@pytest.mark.trio
async def test_sync_request_context(sync_app: _QuartTrio) -> None:
    test_client = sync_app.test_client()
    response = await test_client.get("/")
    assert b"GET" in (await response.get_data())
    response = await test_client.post("/")
    assert b"POST" in (await response.get_data())


@pytest.mark.trio
async def test_sync_generator(sync_app: _QuartTrio) -> None:
    test_client = sync_app.test_client()
    response = await test_client.get("/gen")
    result = await response.get_data()
    assert result[-2:] == b"bb"
    assert int(result[:-2]) != threading.current_thread().ident
