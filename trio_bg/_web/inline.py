"""Running tasks inline, after the response, in the request's own ASGI call: what
Starlette does, and what trio_bg falls back to where it has no nursery (no lifespan
ever started, or no middleware at all), so that tests written for Starlette keep
their meaning."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .._errors import needs_a_handoff, needs_a_journal

if TYPE_CHECKING:
    from .._engine.tasks import Task

logger = logging.getLogger("trio_bg")


async def run_inline(tasks: Iterable[Task]) -> None:
    """Run ``tasks`` one after another, here; the first to raise stops the rest and
    propagates, as in Starlette. Plain functions run in a worker thread, on trio or on
    asyncio (Starlette's TestClient runs apps on asyncio unless told otherwise)."""
    for head in tasks:
        for task in _chain(head):
            if task.is_async:
                await task.func(*task.args, **task.kwargs)
            else:
                await _in_thread(partial(task.func, *task.args, **task.kwargs))


class InlineSink:
    """A `TaskSink` without a nursery: it keeps one request's tasks, to be run with
    `run` once its ASGI call is over."""

    def __init__(self) -> None:
        self._accepted: list[Task] = []

    def admit(self, task: Task) -> None:  # (never a duplicate: no ids are kept)
        """No limits: the tasks run in the request's own call; but no journal either."""
        if task.durable:
            raise needs_a_journal(task.name, "no lifespan started, so no journal keeps it")
        if task.remote is not None:
            raise needs_a_handoff(task.name, "no lifespan started, so nothing hands it off")

    async def commit(self, tasks: Sequence[Task]) -> None:
        """Nothing to store: `admit` refuses durable and remote tasks."""

    def accept(self, tasks: Sequence[Task]) -> None:
        """Keep ``tasks`` for `run` (from any thread: ``list.extend`` is atomic)."""
        self._accepted.extend(tasks)

    def discard(self, tasks: Sequence[Task], reason: str) -> None:
        """Log ``tasks``: they never run."""
        logger.warning(
            "discarded %d background task(s) (%s): %s",
            len(tasks),
            reason,
            ", ".join(task.name for task in tasks),
        )

    async def run(self) -> None:
        """Run the tasks taken so far (see `run_inline`)."""
        tasks, self._accepted = self._accepted, []
        await run_inline(tasks)


def on_trio() -> bool:
    """Whether this code runs in trio (rather than asyncio, say)."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def _chain(task: Task | None) -> Iterable[Task]:
    while task is not None:
        yield task
        task = task.then


async def _in_thread(call: partial[Any]) -> None:
    if on_trio():
        await trio.to_thread.run_sync(call)
        return
    loop = asyncio.get_running_loop()  # RuntimeError on any other event loop
    await loop.run_in_executor(None, contextvars.copy_context().run, call)
