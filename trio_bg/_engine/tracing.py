"""OpenTelemetry tracing (the ``tracing`` option): a span for each background task
(each attempt, for a task retried), current while the task runs, so that the spans the
task makes are its children.

The span is a child of what was current when the task was added (the request's span,
say): one trace shows the request and the work it left behind. It carries the task's
name, the attempt, how long it waited, its outcome and how long it ran; a failed or
timed-out attempt sets the span's status to error (a failure is recorded as an exception
event). A remote task takes the trace context to its streaq worker, whose span for it
is then a child of the same request (see trio_bg.streaq). Only the API package is
needed (``pip install "trio-bg[opentelemetry]"``); with no SDK set up the spans cost
next to nothing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError as error:  # pragma: no cover -- the extra is not installed
    raise ImportError(
        'tracing=True needs OpenTelemetry\'s API: pip install "trio-bg[opentelemetry]"'
    ) from error

if TYPE_CHECKING:
    from .events import TaskEvent
    from .tasks import Task


class TaskTracer:
    """Makes and annotates the spans of one nursery's tasks: the span of each attempt
    under way, by task (the events of a thread task come from trio's thread, not from
    its context)."""

    def __init__(self) -> None:
        self._tracer = trace.get_tracer("trio_bg")
        self._spans: dict[Task, trace.Span] = {}

    @contextmanager
    def span(self, task: Task) -> Iterator[None]:
        """The span of ``task``'s attempt, current for the code run in this block (the
        trio task that runs an ``async def`` task)."""
        with self._tracer.start_as_current_span(
            _name(task),
            kind=trace.SpanKind.INTERNAL,
            attributes={"trio_bg.task.name": task.name, "trio_bg.task.id": task.id},
            record_exception=False,  # the nursery records the task's own failure
            set_status_on_exception=False,
        ) as span:
            self._spans[task] = span
            try:
                yield
            finally:
                del self._spans[task]

    def begin(self, task: Task, context: contextvars.Context) -> None:
        """Begin the span of an attempt of ``task`` (a thread task) as a child of what
        is current in ``context``, and make it current there: its thread runs the call
        in ``context``. `end` ends it."""
        span = context.run(
            self._tracer.start_span,
            _name(task),
            kind=trace.SpanKind.INTERNAL,
            attributes={"trio_bg.task.name": task.name, "trio_bg.task.id": task.id},
        )
        # (The context is the attempt's own copy: nothing to detach afterwards.)
        context.run(otel_context.attach, trace.set_span_in_context(span))
        self._spans[task] = span

    def end(self, task: Task) -> None:
        """End the span `begin` began for ``task``'s attempt."""
        self._spans.pop(task).end()

    def carrier(self) -> dict[str, str] | None:
        """The current trace context as W3C headers (None if there is none), for a
        remote task to take to its worker."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier or None

    def record(self, task: Task, event: TaskEvent) -> None:
        """Put ``event`` on ``task``'s span, if this is the task's own context."""
        if (span := self._span_of(task)) is None:
            return
        if event.kind == "started":
            span.set_attribute("trio_bg.task.attempt", event.attempt)
            if event.waited is not None:
                span.set_attribute("trio_bg.task.waited", event.waited)
        elif event.kind in ("retrying", "finished"):  # the attempt's span ends
            span.set_attribute("trio_bg.task.outcome", str(event.outcome))
            if event.duration is not None:
                span.set_attribute("trio_bg.task.duration", event.duration)
            if event.outcome in ("failed", "timed_out"):
                span.set_status(trace.StatusCode.ERROR, str(event.outcome))

    def record_failure(self, task: Task, exc: BaseException) -> None:
        """Record the exception ``task`` failed with on its span."""
        if (span := self._span_of(task)) is not None:
            span.record_exception(exc)

    def _span_of(self, task: Task) -> trace.Span | None:
        return self._spans.get(task)


def _name(task: Task) -> str:
    return f"background task {task.name}"
