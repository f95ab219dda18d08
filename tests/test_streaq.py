"""Remote tasks, web side: handed to a streaq worker's queue in a real Redis before the
response's body goes out, batched, counted, and never lost silently."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any, cast

import fastapi
import pytest
import streaq
import trio
from conftest import StartupFailed, asgi_client, run_lifespan, served
from redis_server import RedisServer

import trio_bg
import trio_bg.streaq
from trio_bg import fastapi as trio_bg_fastapi
from trio_bg._engine.events import TaskEvent
from trio_bg._keeping.streaq_worker import sender_of
from trio_bg._running.nursery import remote_keeper, wait_drained
from trio_bg._web.middleware import HANDOFF_FAILED_TEXT, ASGIApp

Handler = Callable[[trio_bg.BackgroundTasks], Any]


def endpoint(handler: Handler) -> ASGIApp:
    """A raw ASGI app whose requests call ``handler(current_tasks())``, then answer OK."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler(trio_bg.current_tasks())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"OK"})

    return app  # type: ignore[return-value]


class Queue:
    """A worker made the trio_bg way, with two remote tasks, and what its queue holds."""

    def __init__(self, url: str) -> None:
        self.worker = trio_bg.streaq.worker(url)
        self.done: list[str] = []
        self._changed = trio.Event()

        @self.worker.task(name="tests.welcome")
        async def welcome(address: str, *, name: str = "you") -> None:
            self.done.append(f"{address} {name}")
            self._changed.set()

        self.welcome = welcome
        self.look: streaq.Worker[Any]  # set by the fixture

    async def wait_done(self, count: int) -> None:
        while len(self.done) < count:
            self._changed = trio.Event()
            await self._changed.wait()

    async def stored(self) -> list[dict[str, Any]]:
        """The task data in Redis, read back raw (each must be JSON)."""
        redis = self.look.redis
        keys = await redis.keys(self.worker.task_key + "*")
        return [json.loads(await redis.get(key)) for key in sorted(keys)]  # type: ignore[arg-type]


@asynccontextmanager
async def looking_into(url: str) -> AsyncIterator[Queue]:
    queue = Queue(url)
    async with sender_of(queue.worker) as queue.look:  # the test's own connection
        yield queue


@pytest.fixture
async def queue(redis_server: RedisServer) -> AsyncIterator[Queue]:
    async with looking_into(redis_server.url) as queue:
        yield queue


@pytest.fixture
async def durable_queue(durable_redis_server: RedisServer) -> AsyncIterator[Queue]:
    async with looking_into(durable_redis_server.url) as queue:
        yield queue


async def run_worker_until_empty(queue: Queue) -> None:
    """Run ``queue``'s worker in this process, on trio, until its queue is empty."""
    queue.worker.burst = True
    with trio.fail_after(10):
        await queue.worker.run_async()


async def test_a_remote_task_reaches_redis_as_json_before_the_response(queue: Queue) -> None:
    events: list[TaskEvent] = []
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "a@example.com", name="Ann")),
        streaq=queue.worker,
        on_event=events.append,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/")).text == "OK"
        # Acknowledged by Redis before the body went out: there now, as JSON.
        [data] = await queue.stored()
        assert data["f"] == "tests.welcome"
        assert (data["a"], data["k"]) == (["a@example.com"], {"name": "Ann"})
        stats = app.nursery.stats
        assert (stats.accepted, stats.handed_off, stats.pending, stats.running) == (1, 1, 0, 0)
        assert stats.accepted == stats.finished
    assert app.report.handed_off == 1
    assert app.report.all_completed
    assert "1 handed off" in str(app.report)
    assert [(event.kind, event.outcome) for event in events] == [
        ("accepted", None),
        ("finished", "handed_off"),
    ]


async def test_a_worker_on_trio_runs_what_a_handler_added(queue: Queue) -> None:
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "b@example.com")),
        streaq=queue.worker,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        for _ in range(3):
            assert (await client.get("/")).status_code == 200
    await run_worker_until_empty(queue)
    assert queue.done == ["b@example.com you"] * 3
    assert await queue.stored() == []  # done: streaq removed the task data


async def test_local_and_remote_tasks_in_one_request(queue: Queue) -> None:
    ran: list[str] = []

    async def local(what: str) -> None:
        ran.append(what)

    def handler(tasks: trio_bg.BackgroundTasks) -> None:
        tasks.ordered = True
        tasks.add_task(local, "first")
        tasks.add_task(queue.welcome, "c@example.com")
        tasks.add_task(local, "second")

    app = trio_bg.BackgroundTaskMiddleware(endpoint(handler), streaq=queue.worker)
    async with run_lifespan(app), asgi_client(app) as client:
        await client.get("/")
        await app.nursery.wait_idle()
        stats = app.nursery.stats
        assert (stats.completed, stats.handed_off) == (2, 1)
    assert ran == ["first", "second"]  # the local ones still take turns
    assert len(await queue.stored()) == 1


async def test_concurrent_requests_share_a_round_trip(queue: Queue) -> None:
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "d@example.com")),
        streaq=queue.worker,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        remote = remote_keeper(app.nursery)
        assert remote is not None
        handoff = remote.handoff
        trips = 0
        publish = handoff._publish

        async def counted(tasks: Any, **options: Any) -> None:
            nonlocal trips
            trips += 1
            await publish(tasks, **options)

        handoff._publish = counted  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(client.get, "/")
        assert app.nursery.stats.handed_off == 50
    assert len(await queue.stored()) == 50
    assert trips < 50 / 2  # each round trip carried the tasks gathered meanwhile


async def test_bad_calls_fail_in_the_handler(queue: Queue) -> None:
    errors: list[str] = []

    def handler(tasks: trio_bg.BackgroundTasks) -> None:
        for call in (
            lambda: tasks.add_task(queue.welcome, object()),  # not JSON
            lambda: tasks.add_task(queue.welcome, ("a", "b")),  # a tuple comes back a list
            lambda: tasks.add_task(queue.welcome),  # a missing argument
            lambda: tasks.add_task(queue.welcome, "x", nobody=1),  # type: ignore[call-arg]
        ):
            try:
                call()
            except TypeError as error:
                errors.append(str(error))

    app = trio_bg.BackgroundTaskMiddleware(endpoint(handler), streaq=queue.worker)
    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/")).status_code == 200
        assert app.nursery.stats.accepted == 0
    assert len(errors) == 4
    assert "argument 1 of remote task tests.welcome is not JSON (it holds a object)" in errors[0]
    assert "would come back from JSON as a list, not a tuple" in errors[1]
    assert "missing 1 required positional argument: 'address'" in errors[2]
    assert "unexpected keyword argument 'nobody'" in errors[3]
    assert await queue.stored() == []


async def test_a_remote_task_needs_its_worker_given_to_the_nursery(queue: Queue) -> None:
    other = trio_bg.streaq.worker("redis://127.0.0.1:1")

    @other.task(name="tests.other")
    async def elsewhere() -> None: ...

    async with trio_bg.open_background_nursery() as nursery:
        with pytest.raises(RuntimeError, match="hands off to no streaq worker: give its worker"):
            nursery.start_soon(queue.welcome, "e@example.com")
    async with trio_bg.open_background_nursery(streaq=queue.worker) as nursery:
        with pytest.raises(RuntimeError, match="to another streaq worker"):
            nursery.start_soon(elsewhere)


def test_a_pickling_worker_is_refused() -> None:
    pickling = streaq.Worker(redis_url="redis://127.0.0.1:1", anyio_backend="trio")
    with pytest.raises(TypeError, match="unpickles what it reads"):
        trio_bg.BackgroundTaskMiddleware(endpoint(lambda tasks: None), streaq=pickling)
    with pytest.raises(TypeError, match="expected a streaq Worker"):
        trio_bg.BackgroundTaskMiddleware(endpoint(lambda tasks: None), streaq="redis://")
    with pytest.raises(TypeError, match="sets serializer itself"):
        trio_bg.streaq.worker(serializer=json.dumps)


async def test_a_nursery_started_outside_a_request_hands_off_too(queue: Queue) -> None:
    async with trio_bg.open_background_nursery(streaq=queue.worker) as nursery:
        nursery.start_soon(queue.welcome, "f@example.com")
        await wait_drained(nursery)
        assert nursery.stats.handed_off == 1
    assert nursery.report.handed_off == 1
    assert len(await queue.stored()) == 1


async def test_redis_down_turns_the_response_into_a_503(
    queue: Queue, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "g@example.com")),
        streaq=queue.worker,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        redis_server.kill()
        response = await client.get("/")
        assert response.status_code == 503
        assert response.text == HANDOFF_FAILED_TEXT
        stats = app.nursery.stats
        assert (stats.accepted, stats.discarded, stats.handed_off) == (0, 1, 0)
        redis_server.start()  # back: hand-offs work again (streaq's functions reloaded)
        assert (await client.get("/")).status_code == 200
        assert app.nursery.stats.handed_off == 1
    assert "Redis did not take 1 task(s)" in caplog.text
    assert "discarded 1 background task(s)" in caplog.text


async def test_a_streaming_response_is_aborted_when_redis_is_down(
    queue: Queue, redis_server: RedisServer
) -> None:
    async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        trio_bg.current_tasks().add_task(queue.welcome, "h@example.com")
        redis_server.kill()
        await send({"type": "http.response.body", "body": b"end"})

    app = trio_bg.BackgroundTaskMiddleware(streaming, streaq=queue.worker)  # type: ignore[arg-type]
    async with run_lifespan(app), asgi_client(app) as client:
        with pytest.raises(trio_bg.HandoffError, match="Redis did not take 1 task"):
            await client.get("/")
        assert app.nursery.stats.discarded == 1


async def test_redis_unreachable_fails_the_startup(redis_server: RedisServer) -> None:
    queue = Queue(redis_server.url)
    redis_server.kill()
    app = trio_bg.BackgroundTaskMiddleware(endpoint(lambda tasks: None), streaq=queue.worker)
    with pytest.raises(StartupFailed, match="cannot reach Redis for streaq queue 'default'"):
        async with run_lifespan(app):
            pass


async def test_no_arguments_are_logged(queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_bg")
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "secret@example.com")),
        streaq=queue.worker,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        await client.get("/")
    assert "tests.welcome" in caplog.text
    assert "secret" not in caplog.text


# -- with a journal: the outbox --------------------------------------------------------


def journal_rows(path: Path) -> list[tuple[str, str]]:
    """The rows still to hand off (once Redis has one, its row waits, with its receipt,
    until a worker has taken it: see test_outage)."""
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            "SELECT name, arguments FROM tasks WHERE sent IS NULL ORDER BY id"
        ).fetchall()


class HandedOff:
    """An ``on_event`` hook: `wait_for` returns once ``count`` tasks were handed off."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def __call__(self, event: TaskEvent) -> None:
        if event.outcome == "handed_off":
            self.count += 1
            self._changed.set()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(10):
            while self.count < count:
                self._changed = trio.Event()
                await self._changed.wait()


def outbox_app(
    queue: Queue, path: Path, address: str
) -> tuple[trio_bg.BackgroundTaskMiddleware, list[trio_bg.TaskHandle], HandedOff]:
    """An app whose every request hands ``queue.welcome(address)`` to Redis through the
    journal at ``path`` (its outbox while Redis is down): the app, the handles of the
    tasks its requests added, and what was handed off."""
    handed_off = HandedOff()
    handles: list[trio_bg.TaskHandle] = []
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: handles.append(tasks.add_task(queue.welcome, address))),
        streaq=queue.worker,
        journal=path,
        on_event=handed_off,
    )
    return app, handles, handed_off


async def test_with_a_journal_redis_down_loses_nothing(
    durable_queue: Queue, durable_redis_server: RedisServer, tmp_path: Path
) -> None:
    queue = durable_queue
    path = tmp_path / "tasks.db"
    app, _, handed_off = outbox_app(queue, path, "i@example.com")
    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/")).status_code == 200
        await handed_off.wait_for(1)
        durable_redis_server.stop()
        for _ in range(3):  # Redis is down: the journal keeps them, the answers are 200
            assert (await client.get("/")).status_code == 200
        assert journal_rows(path) == [("streaq:tests.welcome", '[["i@example.com"],{}]')] * 3
        stats = app.nursery.stats
        assert (stats.accepted, stats.pending, stats.handed_off) == (4, 3, 1)
        durable_redis_server.start()  # forwarding resumes on its own
        await handed_off.wait_for(4)
    assert app.report.handed_off == 4
    assert journal_rows(path) == []
    assert len(await queue.stored()) == 4


async def test_a_remote_task_cancelled_in_the_outbox_is_never_handed_off(
    durable_queue: Queue, durable_redis_server: RedisServer, tmp_path: Path
) -> None:
    queue = durable_queue
    path = tmp_path / "tasks.db"
    app, handles, handed_off = outbox_app(queue, path, "o@example.com")
    async with run_lifespan(app), asgi_client(app) as client:
        assert (await client.get("/")).status_code == 200
        await handed_off.wait_for(1)
        durable_redis_server.stop()
        for _ in range(2):  # Redis is down: they wait in the journal's outbox
            assert (await client.get("/")).status_code == 200
        assert await app.nursery.cancel_task(handles[1].id) is True
        durable_redis_server.start()
        await handed_off.wait_for(2)  # the other one: then the outbox is empty
        status = await app.nursery.task_status(handles[1].id)
        assert status is not None and status.state == "cancelled"
    assert app.report.handed_off == 2 and app.report.cancelled_on_request == 1
    assert journal_rows(path) == []
    redis = queue.look.redis
    keys = await redis.keys(queue.worker.task_key + "*")
    in_redis = {key.decode() if isinstance(key, bytes) else str(key) for key in keys}
    if queue.worker.task_key + handles[1].id in in_redis:
        # Its batch was on its way when it was cancelled: the workers are told to abort it.
        assert await redis.sismember(queue.look._abort_key, handles[1].id)
        assert len(in_redis) == 3
    else:
        assert len(in_redis) == 2


async def test_another_processs_remote_task_in_the_outbox_is_waited_for_through_redis(
    durable_queue: Queue, durable_redis_server: RedisServer, tmp_path: Path
) -> None:
    queue = durable_queue
    path = tmp_path / "tasks.db"
    app, handles, handed_off = outbox_app(queue, path, "w@example.com")
    async with (
        run_lifespan(app),
        asgi_client(app) as client,
        trio_bg.open_background_nursery(journal=path, streaq=queue.worker) as other,
        trio.open_nursery() as nursery,
    ):
        durable_redis_server.stop()
        assert (await client.get("/")).status_code == 200  # in the journal's outbox
        waited: list[trio_bg.TaskStatus] = []

        async def wait_in_the_other() -> None:  # its row, until Redis has the task
            waited.append(await other.wait_task(handles[0].id, timeout=20))

        nursery.start_soon(wait_in_the_other)
        durable_redis_server.start()
        await handed_off.wait_for(1)  # then a worker takes it, and its row goes
        queue.worker.burst = True
        with trio.fail_after(20):
            await queue.worker.run_async()
    [status] = waited
    assert (status.id, status.state) == (handles[0].id, "completed")
    assert queue.done == ["w@example.com you"]


async def test_with_a_journal_the_backlog_is_bounded(
    queue: Queue, redis_server: RedisServer, tmp_path: Path
) -> None:
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: tasks.add_task(queue.welcome, "j@example.com")),
        streaq=queue.worker,
        journal=tmp_path / "tasks.db",
        max_running=1,
        max_pending=2,
        grace_period=0,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        redis_server.kill()
        statuses = [(await client.get("/")).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 503, 503]  # room for 3 (1 running + 2 pending)
        assert app.nursery.stats.rejected == 2
    assert (app.report.cancelled, app.report.deferred) == (3, 3)


async def test_what_was_not_forwarded_at_shutdown_goes_at_the_next_start(
    queue: Queue, redis_server: RedisServer, tmp_path: Path
) -> None:
    path = tmp_path / "tasks.db"

    handed_off = HandedOff()

    def make_app() -> trio_bg.BackgroundTaskMiddleware:
        return trio_bg.BackgroundTaskMiddleware(
            endpoint(lambda tasks: tasks.add_task(queue.welcome, "k@example.com")),
            streaq=queue.worker,
            journal=path,
            grace_period=0.2,
            on_event=handed_off,
        )

    redis_server.kill()
    first = make_app()
    async with run_lifespan(first), asgi_client(first) as client:  # starts without Redis
        for _ in range(2):
            assert (await client.get("/")).status_code == 200
    report = first.report
    assert (report.accepted, report.cancelled, report.deferred, report.outbox) == (2, 2, 2, 2)
    assert "2 deferred to the next start (2 remote, not yet handed to Redis)" in str(report)
    assert len(journal_rows(path)) == 2

    redis_server.start()
    second = make_app()
    async with run_lifespan(second):
        await handed_off.wait_for(2)
    assert (second.report.recovered, second.report.handed_off) == (2, 2)
    assert journal_rows(path) == []
    assert len(await queue.stored()) == 2


# -- the integrations ------------------------------------------------------------------


async def test_quart_add_background_task_of_a_remote_task_hands_it_off(queue: Queue) -> None:
    from quart_trio import QuartTrio

    from trio_bg import quart_trio as trio_bg_quart_trio

    app = QuartTrio(__name__)
    trio_bg_quart_trio.init_app(app, streaq=queue.worker)

    @app.route("/")
    async def index() -> str:
        app.add_background_task(queue.welcome, "l@example.com")
        return "OK"

    async with served(cast(ASGIApp, app)) as client:
        assert (await client.get("/")).text == "OK"
        [data] = await queue.stored()  # in Redis before the answer: not run here
        assert (data["f"], data["a"]) == ("tests.welcome", ["l@example.com"])
    assert queue.done == []


async def test_fastapi_background_tasks_of_a_remote_task_hand_it_off(queue: Queue) -> None:
    app = fastapi.FastAPI()
    trio_bg_fastapi.install(app, streaq=queue.worker)

    @app.get("/")
    async def index(background_tasks: fastapi.BackgroundTasks) -> str:
        background_tasks.add_task(queue.welcome, "m@example.com", name="Max")
        return "OK"

    async with served(cast(ASGIApp, app)) as client:
        assert (await client.get("/")).json() == "OK"
        [data] = await queue.stored()
        assert (data["a"], data["k"]) == (["m@example.com"], {"name": "Max"})
    assert queue.done == []


async def test_a_remote_tasks_analysis_is_kept(queue: Queue) -> None:
    """A streaq task cannot be hashed (a dataclass): its analysis is kept by identity
    all the same, not redone (an ``inspect.signature`` and a compile) at every add."""
    from trio_bg._engine.calls import spec_of

    assert spec_of(queue.welcome) is spec_of(queue.welcome)


def test_the_worker_for_trio_bg_has_its_own_defaults() -> None:
    made = trio_bg.streaq.worker("redis://127.0.0.1:1", concurrency=4)
    assert made.anyio_backend == "trio"
    assert made.idle_timeout == trio_bg.streaq.DEFAULT_IDLE_TIMEOUT * 1000 == 10_000  # ms
    assert made.grace_period == trio_bg.streaq.DEFAULT_GRACE_PERIOD == 10
    assert made.concurrency == 4  # streaq's own options pass through
    assert json.loads(made.serializer({"r": ValueError("no"), "t": (1, 2)})) == {
        "r": {"error": "ValueError", "message": "no"},  # a failed task's result is stored
        "t": [1, 2],
    }
    trio_bg.streaq.check_worker(made)


async def test_a_remote_task_where_no_middleware_serves_is_refused(queue: Queue) -> None:
    with pytest.raises(RuntimeError, match="no BackgroundTaskMiddleware serves this request"):
        trio_bg.BackgroundTasks().add_task(queue.welcome, "n@example.com")


async def test_the_remote_example_hands_off_and_a_worker_sends(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys

    from trio_bg.testing import open_test_client

    monkeypatch.setenv("REDIS_URL", redis_server.url)
    sys.modules.pop("examples.remote_app", None)
    example = importlib.import_module("examples.remote_app")
    async with open_test_client(example.app) as client:
        response = await client.post("/signup", params={"user_id": 42})
        assert response.text == "welcome, user 42\n"
        await client.drain()
        stats = client.middleware.nursery.stats
        assert (stats.handed_off, stats.completed) == (1, 1)  # the e-mail, the audit
    assert example.sent == set()  # not sent by the web process
    example.worker.burst = True
    with trio.fail_after(10):
        await example.worker.run_async()
    assert example.sent == {42}


# -- task handles: the id is streaq's; statuses, waits and aborts through Redis ---------


async def test_a_remote_tasks_status_comes_from_redis(queue: Queue) -> None:
    handles: list[trio_bg.TaskHandle] = []
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: handles.append(tasks.add_task(queue.welcome, "s@example.com"))),
        streaq=queue.worker,
    )
    async with run_lifespan(app), asgi_client(app) as client:
        await client.get("/")
        [handle] = handles
        assert await queue.look.status_by_id(handle.id) == "queued"  # streaq's own id
        status = await app.nursery.task_status(handle.id)
        assert status is not None
        assert (status.name, status.state) == ("tests.welcome", "handed_off")
        await run_worker_until_empty(queue)
        done = await app.nursery.wait_task(handle.id, timeout=10)
        assert (done.state, done.error) == ("completed", None)
        assert done.ended_at is not None
        again = await app.nursery.task_status(handle.id)
        assert again is not None and again.state == "completed"


async def test_a_running_remote_task_is_aborted_on_its_worker(redis_server: RedisServer) -> None:
    started = trio.Event()
    cleaned = trio.Event()
    async with looking_into(redis_server.url) as queue:

        @queue.worker.task(name="tests.slow")
        async def slow() -> None:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cleaned.set()

        async with one_remote_task_running(queue, slow) as (app, handle):
            await started.wait()
            status = await app.nursery.task_status(handle.id)
            assert status is not None and status.state == "running"
            with trio.fail_after(10):
                assert await app.nursery.cancel_task(handle.id) is True
            assert cleaned.is_set()
            ended = await app.nursery.wait_task(handle.id, timeout=10)
            assert ended.state == "cancelled"


async def test_a_keyed_remote_task_is_handed_off_once_by_every_web_process(
    redis_server: RedisServer,
) -> None:
    async with looking_into(redis_server.url) as queue:

        @trio_bg.task(key="receipt:{order}")
        @queue.worker.task(name="tests.receipt")
        async def receipt(order: int) -> None:
            queue.done.append(f"receipt {order}")

        handles: list[trio_bg.TaskHandle] = []
        apps = [
            trio_bg.BackgroundTaskMiddleware(
                endpoint(lambda tasks: handles.append(tasks.add_task(receipt, 9))),
                streaq=queue.worker,
            )
            for _ in range(2)
        ]
        async with run_lifespan(apps[0]), run_lifespan(apps[1]):
            for app in apps:  # two web processes, one Redis
                async with asgi_client(app) as client:
                    await client.get("/")
            first, second = handles
            assert first == second  # the id made of the key: the same everywhere
            assert (apps[0].nursery.stats.handed_off, apps[1].nursery.stats.deduplicated) == (1, 1)
            assert len(await queue.stored()) == 1
            await run_worker_until_empty(queue)
    assert queue.done == ["receipt 9"]


async def test_a_streaq_task_takes_only_a_key_from_trio_bg_task(queue: Queue) -> None:
    with pytest.raises(TypeError, match="only a deduplication key"):
        trio_bg.task(timeout=5)(queue.welcome)
        trio_bg.BackgroundTasks().add_task(queue.welcome, "x@example.com")


async def test_a_remote_tasks_progress_reaches_the_web_process(redis_server: RedisServer) -> None:
    said = trio.Event()
    gate = trio.Event()
    async with looking_into(redis_server.url) as queue:

        @queue.worker.task(name="tests.export")
        async def export() -> None:
            trio_bg.set_progress(0.5, "half of the rows")
            said.set()
            await gate.wait()

        async with one_remote_task_running(queue, export) as (app, handle):
            await said.wait()
            status = await progress_of(app.nursery, handle.id)
            assert (status.state, status.progress, status.message) == (
                "running",
                0.5,
                "half of the rows",
            )
            gate.set()
            done = await app.nursery.wait_task(handle.id, timeout=10)
            assert (done.state, done.progress) == ("completed", 0.5)


async def progress_of(nursery: trio_bg.BackgroundNursery, task_id: str) -> trio_bg.TaskStatus:
    """The status of remote task ``task_id`` once its progress has reached Redis."""
    with trio.fail_after(10):
        # Written by a trio task of the worker's run: Redis is the only witness.
        while True:
            status = await nursery.task_status(task_id)
            if status is not None and status.progress is not None:
                return status
            await trio.sleep(0.01)


@asynccontextmanager
async def one_remote_task_running(
    queue: Queue, func: Any
) -> AsyncIterator[tuple[trio_bg.BackgroundTaskMiddleware, trio_bg.TaskHandle]]:
    """An app that added one ``func`` task (handed to Redis), and ``queue``'s worker
    running in this process, for the block."""
    handles: list[trio_bg.TaskHandle] = []
    app = trio_bg.BackgroundTaskMiddleware(
        endpoint(lambda tasks: handles.append(tasks.add_task(func))), streaq=queue.worker
    )
    async with run_lifespan(app), asgi_client(app) as client, trio.open_nursery() as workers:
        await client.get("/")
        workers.start_soon(queue.worker.run_async)
        yield app, handles[0]
        workers.cancel_scope.cancel()


async def test_a_plain_remote_tasks_progress_reaches_the_web_process_too(
    redis_server: RedisServer,
) -> None:
    gate = threading.Event()
    async with looking_into(redis_server.url) as queue:

        @queue.worker.task(name="tests.plain_export")
        def plain_export() -> None:  # streaq runs it in a worker thread
            trio_bg.set_progress(0.25, "a quarter")
            gate.wait(10)

        async with one_remote_task_running(queue, plain_export) as (app, handle):
            status = await progress_of(app.nursery, handle.id)
            assert (status.progress, status.message) == (0.25, "a quarter")
            gate.set()
            done = await app.nursery.wait_task(handle.id, timeout=10)
            assert done.state == "completed"
