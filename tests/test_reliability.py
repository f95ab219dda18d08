"""Every way a task was still lost, or the server left half-broken (issue 8), one test
(or a few) per case: each failed before its fix.

The multi-process cases live in test_hypercorn_workers.py and test_workers.py; the
command line's in test_cli_checks.py and test_serve.py.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import run_hypercorn, run_lifespan

import trio_bg
from trio_bg._running.nursery import stopping, wait_drained
from trio_bg._web.middleware import Receive, Scope, Send
from trio_bg.testing import TaskFailures, open_test_client

HEADERS = [(b"content-type", b"text/plain")]


class Stop(BaseException):
    """A BaseException of the user's own: a failure like any other."""


async def respond(send: Send, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": body})


def assert_books_balance(stats: trio_bg.TaskStats) -> None:
    assert stats.accepted == stats.pending + stats.running + stats.finished, stats


# -- 1. BaseException from a task or a hook ----------------------------------------------


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "thread"])
async def test_a_custom_base_exception_is_a_failure_and_the_nursery_lives_on(
    blocking: bool,
) -> None:
    def raise_it() -> None:
        raise Stop

    async def araise_it() -> None:
        raise Stop

    errors: list[BaseException] = []
    async with trio_bg.open_background_nursery(
        on_error=lambda name, exc: errors.append(exc)
    ) as nursery:
        nursery.start_soon(raise_it if blocking else araise_it)
        await nursery.wait_idle()
        nursery.start_soon(trio.sleep, 0)  # still takes work
        await nursery.wait_idle()
        assert not nursery.closed
    assert (nursery.report.failed, nursery.report.completed) == (1, 1)
    assert [type(error) for error in errors] == [Stop]


@pytest.mark.parametrize(
    ("stopper", "blocking"),
    [(KeyboardInterrupt, False), (SystemExit, False), (SystemExit, True)],
    ids=["KeyboardInterrupt", "SystemExit", "SystemExit-in-a-thread"],
)
async def test_keyboard_interrupt_or_system_exit_drains_reports_then_propagates(
    stopper: type[BaseException], blocking: bool, autojump_clock: trio.testing.MockClock
) -> None:
    ran_to_the_end: list[str] = []
    refused: list[BaseException] = []

    async def finishes_in_the_grace_period() -> None:
        await trio.sleep(5)
        ran_to_the_end.append("five seconds")

    def stop_now() -> None:
        raise stopper(0) if stopper is SystemExit else stopper()

    async def astop_now() -> None:
        stop_now()

    with pytest.raises(stopper):
        async with trio_bg.open_background_nursery(grace_period=10) as nursery:
            nursery.start_soon(finishes_in_the_grace_period)
            nursery.start_soon(forever)
            nursery.start_soon(stop_now if blocking else astop_now)
            await stopping(nursery)
            with pytest.raises(trio_bg.NurseryClosed) as closed:  # no new work from here
                nursery.start_soon(trio.sleep, 0)
            refused.append(closed.value)
            await trio.sleep_forever()  # cancelled once the shutdown is done
    report = nursery.report
    assert ran_to_the_end == ["five seconds"]
    assert (report.accepted, report.completed, report.failed, report.cancelled) == (3, 1, 1, 1)
    assert report.duration == 10  # the grace period ran from the task's exit on
    assert report.unfinished == ("forever",)
    assert refused


async def forever() -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize("hook", ["on_error", "on_event"])
async def test_a_hook_raising_system_exit_stops_the_nursery_the_same_way(
    hook: str, autojump_clock: trio.testing.MockClock
) -> None:
    async def fails() -> None:
        raise ValueError("boom")

    def stopping_hook(*args: Any) -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        async with trio_bg.open_background_nursery(**{hook: stopping_hook}) as nursery:  # type: ignore[arg-type]
            nursery.start_soon(fails)
            await trio.sleep_forever()
    assert nursery.report.failed == 1


async def test_a_hook_raising_a_custom_base_exception_is_logged_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def hook(event: trio_bg.TaskEvent) -> None:
        raise Stop

    async with trio_bg.open_background_nursery(on_event=hook) as nursery:
        nursery.start_soon(trio.sleep, 0)
        await nursery.wait_idle()
    assert nursery.report.all_completed
    assert any("the on_event hook failed" in record.message for record in caplog.records)


async def test_system_exit_in_a_task_stops_a_hypercorn_server_after_the_drain() -> None:
    """Before: the nursery died, Hypercorn served on, every task-adding request got a
    503 forever. Now the drain runs, the report is kept, and the server stops."""
    finished = trio.Event()

    async def slow_but_in_time() -> None:
        await trio.sleep(0.2)
        finished.set()

    async def exits() -> None:
        raise SystemExit(0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(slow_but_in_time)
        trio_bg.current_tasks().add_task(exits)
        await respond(send)

    middleware = trio_bg.BackgroundTaskMiddleware(app, grace_period=5)
    with trio.fail_after(10), pytest.RaisesGroup(SystemExit, flatten_subgroups=True):
        async with run_hypercorn(middleware) as server:
            async with httpx.AsyncClient(base_url=server.url) as client:
                assert (await client.get("/")).status_code == 200
            await trio.sleep_forever()  # the server stops by itself, through the drain
    assert finished.is_set()
    report = middleware.report
    assert (report.accepted, report.completed, report.failed) == (2, 1, 1)


# -- 3. a late add_task from a thread, after its request failed --------------------------


async def test_a_thread_left_by_a_failed_request_adding_a_task_is_discarded_in_trio() -> None:
    go = threading.Event()
    hold = trio.Event()
    outcome: list[BaseException | None] = []
    thread_done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def sync_handler(give_up: trio.CancelScope) -> None:
        trio.from_thread.run_sync(give_up.cancel)  # the request gives up on this thread
        go.wait(5)
        try:
            trio_bg.current_tasks().add_task(trio.sleep, 0)
        except BaseException as error:  # before the fix: RuntimeError, from trio.Event.set
            outcome.append(error)
        else:
            outcome.append(None)
        trio.from_thread.run_sync(thread_done.set, trio_token=token)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        if scope["path"] == "/in-flight":  # its task is collected, not handed off yet
            trio_bg.current_tasks().add_task(trio.sleep, 0)
            await hold.wait()
            await respond(send)
            return
        with trio.CancelScope() as give_up:  # a timeout, say; the thread lives on
            await trio.to_thread.run_sync(sync_handler, give_up, abandon_on_cancel=True)
        raise RuntimeError("the handler timed out")

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with open_test_client(middleware) as client:
        with pytest.raises(RuntimeError, match="timed out"):
            await client.get("/fail")
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.get, "/in-flight")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(client.drain)  # waits for the in-flight request's task
                await trio.testing.wait_all_tasks_blocked()
                go.set()
                await thread_done.wait()
                hold.set()
        stats = client.stats
    assert outcome == [None]
    assert (stats.discarded, stats.accepted, stats.completed, stats.reserved) == (1, 1, 1, 0)


# -- 4. a streamed response whose client went away ---------------------------------------


async def test_a_streamed_response_whose_client_left_has_its_tasks_discarded() -> None:
    ran: list[str] = []
    client_left = trio.Event()
    app_done = trio.Event()

    async def never_runs() -> None:
        ran.append("task")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # A raw app that never reads receive, and streams on after the client left.
        trio_bg.current_tasks().add_task(never_runs)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await client_left.wait()
        await trio.testing.wait_all_tasks_blocked()  # Hypercorn has seen the close
        await send({"type": "http.response.body", "body": b"more", "more_body": True})
        await send({"type": "http.response.body", "body": b"last"})  # dropped by Hypercorn
        app_done.set()

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    with trio.fail_after(10):
        async with run_hypercorn(middleware) as server:
            host, port = server.url.removeprefix("http://").split(":")
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
                received = b""
                while b"first" not in received:
                    received += await stream.receive_some()
            client_left.set()  # hung up after the first chunk
            await app_done.wait()
            await trio.testing.wait_all_tasks_blocked()
            stats = middleware.nursery.stats
    assert ran == []
    assert (stats.discarded, stats.accepted) == (1, 0)


async def test_a_streamed_response_read_to_the_end_runs_its_tasks_and_the_app_reads_on() -> None:
    """The listener reads in the app's stead; the app still gets every message."""
    received: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(trio.sleep, 0)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        received.append((await receive())["type"])  # the body, read by the listener
        await send({"type": "http.response.body", "body": b"b"})

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    with trio.fail_after(10):
        async with (
            run_hypercorn(middleware) as server,
            httpx.AsyncClient(base_url=server.url) as client,
        ):
            response = await client.post("/", content=b"the request body")
            assert response.text == "ab"
            await wait_drained(middleware.nursery)
            assert middleware.nursery.stats.completed == 1
    assert received == ["http.request"]


# -- 5. a thread task's timeout starts when it has a thread ------------------------------


async def test_a_thread_tasks_timeout_does_not_count_its_wait_for_a_thread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = threading.Event()
    events: list[trio_bg.TaskEvent] = []
    holding = trio.Event()

    def on_event(event: trio_bg.TaskEvent) -> None:
        events.append(event)
        if event.kind == "started":
            holding.set()

    @trio_bg.task(name="quick", timeout=1)
    def quick() -> None:
        pass

    async with trio_bg.open_background_nursery(thread_limit=1, on_event=on_event) as bg:
        bg.start_soon(release.wait, 5)
        await holding.wait()  # it holds the only thread now (the thread said so)
        bg.start_soon(quick)
        await trio.sleep(10)  # virtual: far past quick's timeout, had it been running
        stats = bg.stats
        assert (stats.running, stats.pending, stats.threads_in_use) == (1, 1, 1), stats
        assert_books_balance(stats)
        assert [event.kind for event in events if event.name == "quick"] == ["accepted"]
        autojump_clock.autojump_threshold = math.inf  # real threads from here on
        release.set()
        await bg.wait_idle()
    report = bg.report
    assert (report.completed, report.timed_out) == (2, 0)
    started = next(e for e in events if e.name == "quick" and e.kind == "started")
    assert started.waited is not None and started.waited >= 10  # the wait was pending time


async def test_a_thread_task_that_overruns_its_own_timeout_is_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = threading.Event()

    @trio_bg.task(timeout=1)
    def stuck() -> None:
        release.wait(5)

    async with trio_bg.open_background_nursery() as bg:
        bg.start_soon(stuck)
        await bg.wait_idle()  # the clock jumps to the deadline while the thread runs
        release.set()
    assert (bg.report.timed_out, bg.report.abandoned) == (1, 0)


# -- 6. stats from a worker thread -------------------------------------------------------


async def test_stats_can_be_read_from_a_worker_thread_while_tasks_are_pending() -> None:
    gate = trio.Event()
    async with trio_bg.open_background_nursery(max_running=1) as bg:
        bg.start_soon(gate.wait)
        bg.start_soon(gate.wait)
        await trio.testing.wait_all_tasks_blocked()
        stats = await trio.to_thread.run_sync(lambda: bg.stats)  # a plain def endpoint
        gate.set()
    assert (stats.running, stats.pending) == (1, 1)
    assert stats.oldest_pending_age >= 0
    assert_books_balance(stats)


# -- 7. a class with async __call__ ------------------------------------------------------


class Job:
    """Its instances are async callables; the class itself is not."""

    made: list[Job] = []  # noqa: RUF012 -- the test's record

    def __init__(self) -> None:
        Job.made.append(self)

    async def __call__(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_class_with_async_call_runs_as_a_constructor_and_its_instances_as_async() -> None:
    Job.made.clear()
    async with trio_bg.open_background_nursery() as bg:
        bg.start_soon(Job)  # calling the class constructs: a plain call
        bg.start_soon(Job.__new__(Job))  # an instance: awaited
        await bg.wait_idle()
    assert bg.report.completed == 2
    assert len(Job.made) == 1


# -- 8. async hooks ----------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["on_error", "on_event"])
def test_async_hooks_are_refused_when_configured(hook: str) -> None:
    async def async_hook(*args: Any) -> None:
        pass

    with pytest.raises(TypeError, match=f"{hook} must be a plain function, not an async one"):
        trio_bg.BackgroundTaskMiddleware(respond, **{hook: async_hook})  # type: ignore[arg-type]


# -- 9. TaskFailures survives trio's splitting -------------------------------------------


async def test_task_failures_keep_their_type_out_of_the_test_client_block() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(fails)
        trio_bg.current_tasks().add_task(fails)
        await respond(send)

    with pytest.raises(TaskFailures) as raised:
        async with open_test_client(trio_bg.BackgroundTaskMiddleware(app)) as client:
            await client.get("/")
            await client.drain()
    assert len(raised.value.exceptions) == 2


def test_task_failures_derive_keeps_the_type() -> None:
    group = TaskFailures("2 background tasks failed", [ValueError(), KeyError()])
    matched, rest = group.split(ValueError)
    assert type(matched) is TaskFailures and type(rest) is TaskFailures
    assert matched.message == "2 background tasks failed"


# -- 12. the wrapped app's failed lifespan is logged ---------------------------------------


async def test_a_failed_app_shutdown_is_logged_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.failed", "message": "the pool would not close"})

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    with caplog.at_level(logging.ERROR, "trio_bg"):
        async with run_lifespan(middleware) as lifespan:
            pass
    assert lifespan.sent[-1]["type"] == "lifespan.shutdown.failed"
    assert middleware._lifespan_failure == "the app's lifespan shutdown: the pool would not close"
    assert "the app's lifespan shutdown failed: the pool would not close" in caplog.text
