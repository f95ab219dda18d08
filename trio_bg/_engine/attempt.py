"""One attempt of an ``async def`` task: its function run once, under its timeout, and
what became of it."""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from .events import Outcome
from .status import encode_result
from .tasks import Task


class Attempt:
    """The end of one run of a task's function: its `outcome`, the `error` it raised,
    and whether trio was cancelling it then (`cancelled`: it may not be retried)."""

    __slots__ = ("cancelled", "error", "outcome")

    def __init__(self) -> None:
        self.outcome: Outcome = "cancelled"
        self.error: BaseException | None = None
        self.cancelled = False

    async def run(self, task: Task, started: Callable[[], object]) -> None:
        """Call ``started``, then run ``task``'s function once. Its error is kept, never
        raised; trio's cancellation always goes on up (the error stays here).

        The function runs in one cancel scope, ``task.scope`` while it runs: its
        deadline is the task's timeout, and `cancel_task` cancels it, as does the loss
        of a durable task's journal row (one scope for all three: a scope costs about
        as much as the rest of a task's bookkeeping)."""
        try:
            # A task the shutdown cancelled before it was scheduled never starts.
            await trio.lowlevel.checkpoint_if_cancelled()
            started()
            deadline = math.inf if task.timeout is None else trio.current_time() + task.timeout
            with trio.CancelScope(deadline=deadline) as task.scope:
                if task.cancel_requested or task.revoked:
                    task.scope.cancel()
                value = await task.func(*task.args, **task.kwargs)
                self.outcome = "completed"
                if value is not None:
                    task.result = encode_result(value)
                return
            # (Here only when the scope caught its own cancellation.)
            asked = task.cancel_requested or task.revoked  # (else the deadline passed)
            self.outcome = "cancelled" if asked else "timed_out"
        except BaseException as exc:
            cancellation, error = _split_cancellation(exc)
            if error is None:
                raise  # trio's cancellation is never swallowed
            # It failed, perhaps while being cancelled (cleanup code that raised): any
            # BaseException is the task's failure, never just this one trio task's.
            self.outcome = "failed"
            self.error = error
            if cancellation is not None:
                self.cancelled = True
                raise cancellation from None


def _split_cancellation(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``exc`` as (trio's cancellation in it, everything else), either part None."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    if isinstance(exc, trio.Cancelled):
        return exc, None
    return None, exc
