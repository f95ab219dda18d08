"""trio_bg.starlette.TestClient: Starlette's sync test client on trio, which waits for
the background tasks after each request and fails the test when one fails.

The tests are plain ``def`` functions, as with Starlette's own client: the app runs on
trio in the client's portal thread. The tasks are short (50 ms) or cut short by a grace
period in virtual time.
"""

from __future__ import annotations

import importlib
import threading
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import trio_bg
import trio_bg.starlette
from trio_bg._web.middleware import Receive, Scope, Send

with warnings.catch_warnings():
    # Starlette 1.10's TestClient prefers httpx2, and warns once when it finds httpx.
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from trio_bg.starlette import TestClient

BOUND = 10.0
"""Seconds of real time a test of virtual time may take (generous: a noisy CI box)."""


class Shop:
    """A Starlette app whose requests add background tasks; what ran, and where."""

    def __init__(self, **options: object) -> None:
        self.done: list[str] = []
        self.threads: list[threading.Thread] = []
        self.app = Starlette(
            routes=[
                Route("/order", self.order, methods=["POST"]),
                Route("/broken", self.broken, methods=["POST"]),
                Route("/stuck", self.stuck, methods=["POST"]),
            ]
        )
        trio_bg.starlette.install(self.app, **options)  # type: ignore[arg-type]

    def receipt(self, order: str) -> None:  # a thread task: the case the client used to miss
        time.sleep(0.05)
        self.threads.append(threading.current_thread())
        self.done.append(f"receipt {order}")

    async def stock(self, order: str) -> None:
        await trio.sleep(0.05)
        self.done.append(f"stock {order}")

    async def explode(self, order: str) -> None:
        raise LookupError(f"no order {order}")

    async def order(self, request: Request) -> Response:
        order = request.query_params["id"]
        tasks = trio_bg.current_tasks()
        tasks.add_task(self.receipt, order)
        tasks.add_task(self.stock, order)
        return PlainTextResponse("ordered")

    async def broken(self, request: Request) -> Response:
        tasks = trio_bg.current_tasks()
        tasks.add_task(self.explode, "o-1")
        tasks.add_task(self.stock, "o-1")  # runs all the same: failures are isolated
        return PlainTextResponse("ordered")

    async def stuck(self, request: Request) -> Response:
        trio_bg.current_tasks().add_task(trio.sleep_forever)
        return PlainTextResponse("ordered")


def test_an_assertion_right_after_the_request_sees_what_its_tasks_did() -> None:
    shop = Shop(grace_period=2)
    with TestClient(shop.app) as client:
        assert client.post("/order?id=1").text == "ordered"
        assert sorted(shop.done) == ["receipt 1", "stock 1"]
        assert client.stats.completed == 2
        assert shop.threads[0] is not threading.main_thread()
        assert client.post("/order?id=2").status_code == 200
        assert len(shop.done) == 4
    assert (client.report.completed, client.report.unfinished) == (4, ())


def test_a_failing_task_fails_the_request_call_and_skips_nothing() -> None:
    shop = Shop(grace_period=2)
    with TestClient(shop.app) as client:
        with pytest.raises(LookupError, match="no order o-1"):
            client.post("/broken")
        assert shop.done == ["stock o-1"]
        assert client.post("/order?id=2").status_code == 200  # raised once, not again
    assert [name for name, _ in client.task_errors] == [Shop.explode.__qualname__]
    assert (client.report.failed, client.report.completed) == (1, 3)


def test_failures_can_be_inspected_instead() -> None:
    shop = Shop(grace_period=2)
    with TestClient(shop.app, raise_task_errors=False) as client:
        assert client.post("/broken").status_code == 200
        assert shop.done == ["stock o-1"]
    assert [type(exc) for _, exc in client.task_errors] == [LookupError]


def test_without_draining_after_requests_drain_waits_and_the_end_raises() -> None:
    shop = Shop(grace_period=2)
    with TestClient(shop.app, drain_after_request=False) as client:
        client.post("/order?id=1")
        client.drain()
        assert sorted(shop.done) == ["receipt 1", "stock 1"]
    with pytest.raises(LookupError), TestClient(shop.app, drain_after_request=False) as client:
        client.post("/broken")  # not drained: raised when the block ends
    assert client.report.failed == 1


def test_the_grace_period_runs_in_virtual_time() -> None:
    shop = Shop(grace_period=30)
    clock = trio.testing.MockClock(autojump_threshold=0)
    started = time.monotonic()
    with TestClient(
        shop.app, drain_after_request=False, backend_options={"clock": clock}
    ) as client:
        # A task that never ends: the clock jumps ahead whenever the app is idle,
        # also while the test's own thread runs, so only the shutdown's deadline is
        # certain to be reached here.
        client.post("/stuck")
    assert time.monotonic() - started < BOUND
    report = client.report
    assert (report.cancelled, report.unfinished) == (1, ("sleep_forever",))
    assert report.duration == pytest.approx(30)


def test_a_task_failing_during_the_apps_startup_fails_the_test() -> None:
    async def warm_cache() -> None:
        raise ValueError("cache warm-up is broken")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        trio_bg.starlette.middleware_of(app).nursery.start_soon(warm_cache)
        yield

    shop = Shop(grace_period=2)
    shop.app.router.lifespan_context = lifespan
    with TestClient(shop.app) as client, pytest.raises(ValueError, match="warm-up"):
        client.post("/order?id=1")  # the first drain raises it
    assert len(shop.done) == 2


def test_without_with_the_tasks_run_inline_as_in_starlette() -> None:
    """No lifespan, no nursery: the middleware runs the tasks after the response in
    the request's own call, one after another, the first failure stopping the rest."""
    shop = Shop(grace_period=2)
    client = TestClient(shop.app)
    assert client.post("/order?id=1").text == "ordered"
    assert shop.done == ["receipt 1", "stock 1"]  # in order
    with pytest.raises(LookupError):
        client.post("/broken")
    assert shop.done == ["receipt 1", "stock 1"]  # the failure skipped the stock task
    client.drain()  # nothing to wait for
    with pytest.raises(RuntimeError, match="with TestClient"):
        client.middleware  # noqa: B018


def test_the_asyncio_backend_is_refused_with_a_clear_error() -> None:
    with (
        pytest.raises(RuntimeError, match='backend="trio"'),
        TestClient(Shop().app, backend="asyncio"),
    ):
        pass


def test_an_app_without_the_middleware_is_refused() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})

    with pytest.raises(TypeError, match="BackgroundTaskMiddleware"), TestClient(app):
        pass


def test_the_dropin_example(monkeypatch: pytest.MonkeyPatch) -> None:
    example = importlib.import_module("examples.starlette_dropin")
    done: list[tuple[str, int]] = []

    async def send_receipt(order_id: int) -> None:  # the example's, minus the wait
        done.append(("receipt", order_id))

    def notify_warehouse(order_id: int) -> None:
        done.append(("warehouse", order_id))

    monkeypatch.setattr(example, "send_receipt", send_receipt)
    monkeypatch.setattr(example, "notify_warehouse", notify_warehouse)
    with TestClient(example.app) as client:
        assert client.post("/orders/42").json() == {"order": 42}
        assert sorted(done) == [("receipt", 42), ("warehouse", 42)]
