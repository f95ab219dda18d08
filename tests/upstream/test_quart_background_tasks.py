# Ported from Quart, tests/test_background_tasks.py (pallets/quart, commit 506e402e),
# Copyright 2017 Pallets. MIT licence: see
# https://github.com/pallets/quart/blob/main/LICENSE.txt
#
# What changed: the app is a QuartTrio app with trio_bg.quart_trio.init_app (so
# `app.add_background_task` and `app.test_app()` are trio_bg's), and asyncio.sleep is
# trio.sleep. The test bodies are Quart's.
"""Quart's own background-task tests, on Quart-Trio with trio_bg."""

from __future__ import annotations

import time

import trio
from quart import current_app
from quart_trio import QuartTrio

import trio_bg.quart_trio


def Quart(import_name: str) -> QuartTrio:
    """Stands in for the class in the tests below: a QuartTrio app with trio_bg."""
    app = QuartTrio(import_name)
    trio_bg.quart_trio.init_app(app)
    return app


async def test_background_task() -> None:
    app = Quart(__name__)
    app.config["DATA"] = "data"

    data = None

    async def background() -> None:
        nonlocal data
        await trio.sleep(0.5)
        data = current_app.config["DATA"]

    @app.route("/")
    async def index() -> str:
        app.add_background_task(background)
        return ""

    async with app.test_app():
        test_client = app.test_client()
        await test_client.get("/")

    assert data == "data"


async def test_lifespan_background_task() -> None:
    app = Quart(__name__)
    app.config["DATA"] = "data"

    data = None

    async def background() -> None:
        nonlocal data
        await trio.sleep(0.5)
        data = current_app.config["DATA"]

    @app.before_serving
    async def startup() -> None:
        app.add_background_task(background)

    async with app.test_app():
        pass

    assert data == "data"


async def test_sync_background_task() -> None:
    app = Quart(__name__)
    app.config["DATA"] = "data"

    data = None

    def background() -> None:
        nonlocal data
        time.sleep(0.5)
        data = current_app.config["DATA"]

    @app.route("/")
    async def index() -> str:
        app.add_background_task(background)
        return ""

    async with app.test_app():
        test_client = app.test_client()
        await test_client.get("/")

    assert data == "data"
