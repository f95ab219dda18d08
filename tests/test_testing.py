"""trio_bg.testing and its pytest plugin: drain, failures that fail tests, virtual time."""

from __future__ import annotations

import traceback

import pytest
import trio
import trio.testing

import trio_bg
from trio_bg._web.middleware import Receive, Scope, Send
from trio_bg.testing import TaskFailures, open_test_client

HEADERS = [(b"content-length", b"2")]


async def deliver(order_id: str) -> None:
    await trio.sleep(1)


async def note(order_id: str) -> None:
    await trio.lowlevel.checkpoint()


async def explode(order_id: str) -> None:
    raise LookupError(f"no order {order_id}")


async def shop(scope: Scope, receive: Receive, send: Send) -> None:
    """/ok adds a task that completes; /bad one that fails; /slow one that takes a minute."""
    if scope["type"] != "http":
        return
    task = {"/ok": deliver, "/bad": explode, "/slow": trio.sleep}[scope["path"]]
    trio_bg.current_tasks().add_task(task, 60 if task is trio.sleep else "o-1")  # type: ignore[arg-type]
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def trio_bg_app() -> trio_bg.BackgroundTaskMiddleware:
    return trio_bg.BackgroundTaskMiddleware(shop, grace_period=5)


async def test_drain_waits_for_the_tasks_and_the_report_is_there_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(trio_bg.BackgroundTaskMiddleware(shop)) as client:
        await client.get("/ok")
        assert (client.stats.accepted, client.stats.completed) == (1, 0)
        await client.drain()
        assert client.stats.completed == 1
    assert client.report.all_completed


async def test_a_failed_task_is_raised_at_drain_with_its_own_traceback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(trio_bg.BackgroundTaskMiddleware(shop)) as client:
        await client.get("/bad")
        with pytest.raises(LookupError, match="no order o-1") as raised:
            await client.drain()
        frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
        assert "explode" in frames
        await client.drain()  # raised once, not again
    assert client.task_errors == [("explode", raised.value)]


async def test_a_failure_not_drained_is_raised_when_the_client_closes() -> None:
    with pytest.raises(LookupError):
        async with open_test_client(trio_bg.BackgroundTaskMiddleware(shop)) as client:
            await client.get("/bad")
    assert client.report.failed == 1


async def test_several_failures_come_as_a_group() -> None:
    async with open_test_client(trio_bg.BackgroundTaskMiddleware(shop)) as client:
        await client.get("/bad")
        await client.get("/bad")
        with pytest.raises(TaskFailures) as raised:
            await client.drain()
    assert [type(exc) for exc in raised.value.exceptions] == [LookupError, LookupError]


async def test_failures_can_be_inspected_instead() -> None:
    async with open_test_client(
        trio_bg.BackgroundTaskMiddleware(shop), raise_task_errors=False
    ) as client:
        await client.get("/bad")
        await client.drain()
    assert [name for name, _ in client.task_errors] == ["explode"]


async def test_the_grace_period_runs_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(trio_bg.BackgroundTaskMiddleware(shop, grace_period=30)) as client:
        await client.get("/slow")
    assert (client.report.cancelled, client.report.duration) == (1, pytest.approx(30))


async def test_drain_also_waits_for_tasks_of_requests_still_in_flight() -> None:
    added, release = trio.Event(), trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        trio_bg.current_tasks().add_task(note, "o-2")
        added.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"ok"})

    async with open_test_client(trio_bg.BackgroundTaskMiddleware(app)) as client:
        drained = trio.Event()

        async def drain() -> None:
            await client.drain()
            drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.get, "/")
            await added.wait()
            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            assert not drained.is_set() and client.stats.reserved == 1
            release.set()
        assert client.stats.completed == 1


async def test_the_middleware_is_found_inside_another_app(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inner = trio_bg.BackgroundTaskMiddleware(shop)

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        await inner(scope, receive, send)

    async with open_test_client(outer) as client:
        await client.get("/ok")
        await client.drain()
        assert client.middleware is inner


async def test_an_app_without_the_middleware_is_refused() -> None:
    with pytest.raises(TypeError, match="BackgroundTaskMiddleware"):
        async with open_test_client(shop):
            pass


async def test_the_plugin_fixture_gives_a_running_client(
    autojump_clock: trio.testing.MockClock, trio_bg_client: trio_bg.testing.TestClient
) -> None:
    assert (await trio_bg_client.get("/ok")).text == "ok"
    await trio_bg_client.drain()
    assert trio_bg_client.stats.completed == 1


@pytest.mark.trio_bg(raise_task_errors=False)
async def test_the_marker_opts_out_of_raising(trio_bg_client: trio_bg.testing.TestClient) -> None:
    await trio_bg_client.get("/bad")
    await trio_bg_client.drain()
    assert len(trio_bg_client.task_errors) == 1


def test_through_the_plugin_a_failing_task_fails_the_users_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        """
        import pytest, trio_bg

        async def broken():
            raise ValueError("the e-mail never went out")

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            trio_bg.current_tasks().add_task(broken)
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        @pytest.fixture
        def trio_bg_app():
            return trio_bg.BackgroundTaskMiddleware(app)

        async def test_looks_fine(trio_bg_client):
            assert (await trio_bg_client.get("/")).status_code == 204
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # the test's own lines passed; its fixture failed it
    result.stdout.fnmatch_lines(["*ValueError: the e-mail never went out*"])


async def test_a_task_failing_during_the_apps_startup_fails_the_test() -> None:
    async def warm_cache() -> None:
        raise ValueError("cache warm-up is broken")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            scope["state"]["trio_bg.middleware"].nursery.start_soon(warm_cache)
            await trio.testing.wait_all_tasks_blocked()  # it has failed by now
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await shop(scope, receive, send)

    with pytest.raises(ValueError, match="cache warm-up is broken"):
        async with open_test_client(trio_bg.BackgroundTaskMiddleware(app)) as client:
            await client.drain()
