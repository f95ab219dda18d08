"""Task handles in memory: ids, statuses, results, progress, wait, cancel, list, and
deduplication keys."""

from __future__ import annotations

import logging
import re
import threading
from datetime import UTC
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import asgi_client, run_lifespan

import trio_bg
from trio_bg._web.asgi import Receive, Scope, Send

ID = re.compile(r"[0-9a-f]{32}")


async def returns(value: object) -> object:
    return value


async def forever() -> None:
    await trio.sleep_forever()


async def broken(secret: str = "") -> None:
    raise ValueError("boom")


async def test_start_soon_returns_a_handle_with_a_random_id_and_the_name() -> None:
    async with trio_bg.open_background_nursery() as nursery:
        first = nursery.start_soon(returns, 1)
        second = nursery.start_soon(returns, 2)
        await nursery.wait_idle()
    assert isinstance(first, trio_bg.TaskHandle)
    assert ID.fullmatch(first.id) and ID.fullmatch(second.id)
    assert first.id != second.id
    assert first.name == "returns"
    assert str(first) == first.id


async def test_a_status_follows_the_task_from_pending_to_completed_with_its_result() -> None:
    go = trio.Event()

    async def job(n: int) -> dict[str, int]:
        await go.wait()
        return {"n": n}

    async with trio_bg.open_background_nursery(max_running=1) as nursery:
        running = nursery.start_soon(job, 1)
        queued = nursery.start_soon(job, 2)
        await trio.testing.wait_all_tasks_blocked()
        status = await nursery.task_status(running.id)
        assert status is not None
        assert (status.state, status.attempt, status.ended) == ("running", 1, False)
        assert status.started_at is not None and status.started_at.tzinfo is UTC
        queued_status = await nursery.task_status(queued.id)
        assert queued_status is not None
        assert (queued_status.state, queued_status.started_at) == ("pending", None)
        go.set()
        ended = await nursery.wait_task(queued.id)
    assert ended.state == "completed"
    assert ended.result == {"n": 2}
    assert ended.error is None
    assert ended.created_at is not None and ended.ended_at is not None
    assert ended.created_at <= ended.started_at <= ended.ended_at  # type: ignore[operator]


async def test_a_result_that_is_not_json_or_too_long_is_none() -> None:
    async with trio_bg.open_background_nursery() as nursery:
        not_json = nursery.start_soon(returns, object())
        too_long = nursery.start_soon(returns, "x" * 70_000)
        fine = nursery.start_soon(returns, [1, "two", None])
        await nursery.wait_idle()
        assert (await nursery.wait_task(not_json.id)).result is None
        assert (await nursery.wait_task(too_long.id)).result is None
        assert (await nursery.wait_task(fine.id)).result == [1, "two", None]


async def test_a_failure_shows_its_type_and_message_never_its_arguments() -> None:
    async with trio_bg.open_background_nursery() as nursery:
        handle = nursery.start_soon(broken, "card 4242")
        status = await nursery.wait_task(handle.id)
    assert status.state == "failed"
    assert status.error == "ValueError: boom"
    assert "4242" not in repr(status)


async def test_a_plain_function_task_has_a_status_and_result_too() -> None:
    def add(a: int, b: int) -> int:
        return a + b

    async with trio_bg.open_background_nursery() as nursery:
        handle = nursery.start_soon(add, 2, 3)
        status = await nursery.wait_task(handle.id)
    assert (status.state, status.result) == ("completed", 5)


async def test_wait_task_times_out_with_the_builtin_error_and_refuses_unknown_ids(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio_bg.open_background_nursery(grace_period=0) as nursery:
        handle = nursery.start_soon(forever)
        with pytest.raises(TimeoutError):
            await nursery.wait_task(handle.id, timeout=5)
        with pytest.raises(LookupError):
            await nursery.wait_task("0" * 32)
        assert await nursery.task_status("0" * 32) is None
        with pytest.raises(ValueError, match="timeout"):
            await nursery.wait_task(handle.id, timeout=-1)


async def test_cancel_task_cancels_a_pending_task_so_it_never_runs() -> None:
    ran: list[int] = []
    go = trio.Event()

    async def job(n: int) -> None:
        await go.wait()
        ran.append(n)

    async with trio_bg.open_background_nursery(max_running=1) as nursery:
        nursery.start_soon(job, 1)
        queued = nursery.start_soon(job, 2)
        assert await nursery.cancel_task(queued.id) is True
        assert await nursery.cancel_task(queued.id) is False  # (it has ended)
        go.set()
        await nursery.wait_idle()
        status = await nursery.task_status(queued.id)
        stats = nursery.stats
    assert ran == [1]
    assert status is not None and status.state == "cancelled"
    assert (stats.cancelled, stats.cancelled_on_request) == (1, 1)
    report = nursery.report
    assert report.all_completed  # cancelled on purpose: not cut short
    assert report.unfinished == () and report.cancelled_on_request == 1


async def test_cancel_task_cancels_a_running_async_task() -> None:
    cleaned = trio.Event()

    async def job() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cleaned.set()

    async with trio_bg.open_background_nursery() as nursery:
        handle = nursery.start_soon(job)
        await trio.testing.wait_all_tasks_blocked()
        assert await nursery.cancel_task(handle.id) is True
        status = await nursery.wait_task(handle.id)
    assert cleaned.is_set()
    assert status.state == "cancelled"
    assert nursery.report.cancelled_on_request == 1


async def test_cancel_task_cancels_a_task_waiting_for_its_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[int] = []

    @trio_bg.task(retries=3, backoff=trio_bg.Backoff(initial=60, jitter=0))
    async def flaky() -> None:
        attempts.append(1)
        raise ValueError("again")

    async with trio_bg.open_background_nursery() as nursery:
        handle = nursery.start_soon(flaky)
        await trio.testing.wait_all_tasks_blocked()
        status = await nursery.task_status(handle.id)
        assert status is not None and (status.state, status.attempt) == ("retrying", 2)
        assert await nursery.cancel_task(handle.id) is True
        status = await nursery.wait_task(handle.id)
    assert attempts == [1]
    assert status.state == "cancelled"


async def test_a_plain_function_a_thread_runs_cannot_be_cancelled_one_waiting_can() -> None:
    release = threading.Event()
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()
    ran: list[str] = []

    def blocking(label: str) -> None:
        trio.from_thread.run_sync(started.set, trio_token=token)
        release.wait(10)
        ran.append(label)

    async with trio_bg.open_background_nursery(thread_limit=1) as nursery:
        running = nursery.start_soon(blocking, "first")
        waiting = nursery.start_soon(blocking, "second")
        await started.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert await nursery.cancel_task(running.id) is False
        assert await nursery.cancel_task(waiting.id) is True
        release.set()
        first = await nursery.wait_task(running.id)
        second = await nursery.wait_task(waiting.id)
    assert ran == ["first"]
    assert (first.state, second.state) == ("completed", "cancelled")


async def test_set_progress_shows_in_the_status_from_async_and_thread_tasks() -> None:
    halfway = trio.Event()
    go = trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def async_job() -> None:
        trio_bg.set_progress(0.5, "half")
        halfway.set()
        await go.wait()

    def thread_job() -> None:
        trio_bg.set_progress(1, "all")

    async with trio_bg.open_background_nursery() as nursery:
        handle = nursery.start_soon(async_job)
        await halfway.wait()
        status = await nursery.task_status(handle.id)
        assert status is not None and (status.progress, status.message) == (0.5, "half")
        go.set()
        thread = nursery.start_soon(thread_job)
        ended = await nursery.wait_task(thread.id)
    assert (ended.progress, ended.message) == (1.0, "all")
    del token


@pytest.mark.parametrize(
    ("fraction", "message", "error"),
    [(1.5, None, ValueError), (True, None, TypeError), (None, 3, TypeError)],
)
async def test_set_progress_refuses_bad_values_and_works_only_in_a_task(
    fraction: Any, message: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        trio_bg.set_progress(fraction, message)
    with pytest.raises(RuntimeError, match="outside a background task"):
        trio_bg.set_progress(0.5)


async def test_list_tasks_by_state_and_name() -> None:
    go = trio.Event()

    async def waits() -> None:
        await go.wait()

    async with trio_bg.open_background_nursery() as nursery:
        done = nursery.start_soon(returns, 1)
        await nursery.wait_task(done.id)
        live = nursery.start_soon(waits)
        await trio.testing.wait_all_tasks_blocked()
        running = await nursery.list_tasks(state="running")
        assert [status.id for status in running] == [live.id]
        named = await nursery.list_tasks(name="returns")
        assert [status.id for status in named] == [done.id]
        assert len(await nursery.list_tasks()) == 2
        with pytest.raises(ValueError, match="state"):
            await nursery.list_tasks(state="sleeping")  # type: ignore[arg-type]
        go.set()


async def test_ended_statuses_are_kept_up_to_the_limit() -> None:
    async with trio_bg.open_background_nursery(statuses_kept=2) as nursery:
        handles = []
        for n in range(3):
            handles.append(nursery.start_soon(returns, n))
            await nursery.wait_idle()  # (they end in this order)
        kept = [await nursery.task_status(handle.id) for handle in handles]
    assert kept[0] is None
    assert [status.result for status in kept[1:] if status] == [1, 2]


async def test_events_and_log_lines_carry_the_id(caplog: pytest.LogCaptureFixture) -> None:
    events: list[trio_bg.TaskEvent] = []
    async with trio_bg.open_background_nursery(on_event=events.append) as nursery:
        handle = nursery.start_soon(broken)
        await nursery.wait_idle()
    assert {event.id for event in events} == {handle.id}
    assert any(handle.id in record.getMessage() for record in caplog.records)


# -- deduplication keys -------------------------------------------------------------


@trio_bg.task(name="charge", key="charge:{order_id}")
async def charge(order_id: int, amount: int, gate: trio.Event) -> str:
    await gate.wait()
    return f"charged {order_id}"


async def test_a_keyed_task_added_twice_while_live_runs_once_and_shares_its_handle() -> None:
    gate = trio.Event()
    async with trio_bg.open_background_nursery() as nursery:
        first = nursery.start_soon(charge, 7, 100, gate)
        again = nursery.start_soon(charge, 7, 999, gate)
        other = nursery.start_soon(charge, 8, 100, gate)
        assert again == first
        assert other.id != first.id
        assert nursery.stats.deduplicated == 1
        gate.set()
        status = await nursery.wait_task(first.id)
        await nursery.wait_idle()
        assert nursery.stats.completed == 2
        # Ended, and no key_ttl: the key is free again.
        later = nursery.start_soon(charge, 7, 100, gate)
        assert later.id == first.id
        await nursery.wait_idle()
        assert nursery.stats.completed == 3
    assert status.result == "charged 7"


async def test_a_keyed_id_is_the_same_in_every_nursery() -> None:
    gate = trio.Event()
    gate.set()
    async with trio_bg.open_background_nursery() as one, trio_bg.open_background_nursery() as two:
        assert one.start_soon(charge, 7, 1, gate).id == two.start_soon(charge, 7, 1, gate).id


async def test_key_ttl_keeps_an_ended_tasks_key_and_status() -> None:
    runs: list[int] = []

    @trio_bg.task(key=lambda order_id: f"refund:{order_id}", key_ttl=3600)
    async def refund(order_id: int) -> None:
        runs.append(order_id)

    async with trio_bg.open_background_nursery(statuses_kept=0) as nursery:
        first = nursery.start_soon(refund, 1)
        await nursery.wait_idle()
        again = nursery.start_soon(refund, 1)
        status = await nursery.task_status(again.id)
    assert again == first
    assert runs == [1]
    assert status is not None and status.state == "completed"
    assert nursery.report.deduplicated == 1


async def test_bad_keys_are_refused_early() -> None:
    with pytest.raises(TypeError, match="'missing', which is not a parameter"):

        @trio_bg.task(key="x:{missing}")
        async def one(order_id: int) -> None: ...

    with pytest.raises(TypeError, match="needs a key"):
        trio_bg.task(key_ttl=5)
    with pytest.raises(ValueError, match="key_ttl"):
        trio_bg.task(key="k", key_ttl=-1)
    with pytest.raises(TypeError, match="key must be"):
        trio_bg.task(key=5)  # type: ignore[arg-type]

    @trio_bg.task(key=lambda n: n)
    async def not_str(n: int) -> None: ...

    async with trio_bg.open_background_nursery() as nursery:
        with pytest.raises(TypeError, match="must return a str"):
            nursery.start_soon(not_str, 1)
        assert nursery.stats.accepted == 0


# -- in requests ------------------------------------------------------------------


async def test_module_functions_find_the_nursery_of_the_request_and_of_the_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: dict[str, Any] = {}
    caplog.set_level(logging.WARNING)

    async def follow_up(first: str) -> None:
        seen["from task"] = await trio_bg.task_status(first)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        tasks = trio_bg.current_tasks()
        if scope["path"] == "/add":
            handle = tasks.add_task(returns, "hello")
            tasks.add_task(follow_up, handle.id)
            body = handle.id.encode()
        else:
            task_id = scope["query_string"].decode()
            status = await trio_bg.wait_task(task_id, timeout=10)
            body = f"{status.state} {status.result}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware), asgi_client(middleware) as client:
        added = await client.get("/add")
        assert ID.fullmatch(added.text)
        waited = await client.get(f"/wait?{added.text}")
        assert waited.text == "completed hello"
        await middleware.nursery.wait_idle()
    assert seen["from task"] is not None and seen["from task"].id == added.text


async def test_module_functions_refuse_outside_a_request_or_task() -> None:
    with pytest.raises(RuntimeError, match="there is none here"):
        await trio_bg.task_status("0" * 32)


async def test_a_discarded_tasks_status_says_why(autojump_clock: trio.testing.MockClock) -> None:
    handles: list[trio_bg.TaskHandle] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handles.append(trio_bg.current_tasks().add_task(returns, 1))
            raise RuntimeError("the handler broke")

    middleware = trio_bg.BackgroundTaskMiddleware(app)
    async with run_lifespan(middleware):
        transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/")
        status = await middleware.nursery.task_status(handles[0].id)
    assert status is not None and status.state == "cancelled"
    assert status.error is not None and status.error.startswith("discarded")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("its own __str__ broke")


class Unencodable(list[int]):
    def __iter__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("its own __iter__ broke")


async def test_an_error_or_result_whose_own_code_breaks_never_breaks_the_nursery() -> None:
    async def raises() -> None:
        raise Unprintable

    async def returns_it() -> object:
        return Unencodable([1])

    async with trio_bg.open_background_nursery() as nursery:
        failed = nursery.start_soon(raises)
        odd = nursery.start_soon(returns_it)
        failed_status = await nursery.wait_task(failed.id)
        odd_status = await nursery.wait_task(odd.id)
        after = nursery.start_soon(returns, "still here")
        assert (await nursery.wait_task(after.id)).result == "still here"
    assert (failed_status.state, failed_status.error) == ("failed", "Unprintable")
    assert (odd_status.state, odd_status.result) == ("completed", None)


async def test_bad_ids_and_limits_are_refused_at_once() -> None:
    async with trio_bg.open_background_nursery() as nursery:
        for ask in (nursery.task_status, nursery.wait_task, nursery.cancel_task):
            with pytest.raises(TypeError, match="a task id is a str"):
                await ask(42)  # type: ignore[arg-type]
        for limit in (-1, 1.5, True):
            with pytest.raises(ValueError, match="limit must be an int"):
                await nursery.list_tasks(limit=limit)  # type: ignore[arg-type]
