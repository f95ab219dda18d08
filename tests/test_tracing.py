"""OpenTelemetry (``tracing=True``): a span per background task, a child of the request's
span, current while the task runs; checked with the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis_server import RedisServer

import trio_bg
import trio_bg.streaq
from trio_bg._web.middleware import Receive, Scope, Send
from trio_bg.testing import open_test_client

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)  # once per process: OpenTelemetry's rule


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


async def test_each_task_has_a_span_under_the_requests_current_while_it_runs(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("the app")

    @trio_bg.task(name="send_welcome")
    async def send_welcome() -> None:
        with tracer.start_as_current_span("smtp"):
            await trio.lowlevel.checkpoint()

    @trio_bg.task(name="write_audit")
    def write_audit() -> None:
        with tracer.start_as_current_span("disk"):
            pass

    @trio_bg.task(name="fails")
    async def fails() -> None:
        raise ValueError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span("request"):
            tasks = trio_bg.current_tasks()
            tasks.add_task(send_welcome)
            tasks.add_task(write_audit)
            tasks.add_task(fails)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    middleware = trio_bg.BackgroundTaskMiddleware(app, tracing=True)
    async with open_test_client(middleware, raise_task_errors=False) as client:
        await client.get("/")
        await client.drain()

    found = by_name(spans)
    request = found["request"]
    for name, child in (("send_welcome", "smtp"), ("write_audit", "disk"), ("fails", None)):
        span = found[f"background task {name}"]
        assert span.parent is not None and span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        assert span.attributes is not None
        assert span.attributes["trio_bg.task.name"] == name
        assert span.attributes["trio_bg.task.waited"] >= 0  # type: ignore[operator]
        assert span.attributes["trio_bg.task.duration"] >= 0  # type: ignore[operator]
        if child is not None:
            assert found[child].parent is not None
            assert found[child].parent.span_id == span.context.span_id
            assert span.attributes["trio_bg.task.outcome"] == "completed"
        else:
            assert span.attributes["trio_bg.task.outcome"] == "failed"
            assert span.status.status_code is trace.StatusCode.ERROR
            assert [event.name for event in span.events] == ["exception"]


async def test_each_attempt_of_a_retried_task_has_its_own_span_under_the_same_parent(
    spans: InMemorySpanExporter, autojump_clock: trio.testing.MockClock
) -> None:
    attempts = 0

    @trio_bg.task(name="flaky", retries=1)
    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("first")

    with trace.get_tracer("the app").start_as_current_span("startup") as parent:
        async with trio_bg.open_background_nursery(tracing=True) as nursery:
            nursery.start_soon(flaky)
            await nursery.wait_idle()

    first, second = (s for s in spans.get_finished_spans() if s.name == "background task flaky")
    for span in (first, second):
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert first.attributes is not None and second.attributes is not None
    assert (
        first.attributes["trio_bg.task.attempt"],
        second.attributes["trio_bg.task.attempt"],
    ) == (
        1,
        2,
    )
    assert first.attributes["trio_bg.task.outcome"] == "failed"
    assert first.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in first.events] == ["exception"]
    assert second.attributes["trio_bg.task.outcome"] == "completed"


async def test_no_spans_without_the_option(spans: InMemorySpanExporter) -> None:
    async with trio_bg.open_background_nursery() as nursery:
        nursery.start_soon(trio.lowlevel.checkpoint)
    assert spans.get_finished_spans() == ()


def test_tracing_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="tracing must be True or False"):
        trio_bg.BackgroundTaskMiddleware(lambda *a: None, tracing="yes")  # type: ignore[arg-type]


async def test_a_remote_task_takes_the_trace_to_its_worker(
    spans: InMemorySpanExporter, redis_server: RedisServer
) -> None:
    tracer = trace.get_tracer("the app")
    worker = trio_bg.streaq.worker(redis_server.url)

    @worker.task(name="tests.remote_traced")
    async def remote_traced() -> None:
        with tracer.start_as_current_span("inside"):
            await trio.lowlevel.checkpoint()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span("request"):
            trio_bg.current_tasks().add_task(remote_traced)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    middleware = trio_bg.BackgroundTaskMiddleware(app, tracing=True, streaq=worker)
    async with open_test_client(middleware) as client:
        await client.get("/")
    worker.burst = True  # the worker, in this process: it stops once the queue is empty
    with trio.fail_after(10):
        await worker.run_async()

    found = by_name(spans)
    request, remote = found["request"], found["remote task tests.remote_traced"]
    assert remote.parent is not None and remote.parent.span_id == request.context.span_id
    assert remote.context.trace_id == request.context.trace_id
    assert remote.kind is trace.SpanKind.CONSUMER
    assert found["inside"].parent is not None
    assert found["inside"].parent.span_id == remote.context.span_id
