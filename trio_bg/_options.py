"""The options a background nursery takes, checked once, up front."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypedDict

from ._callables import is_async_callable, name_of
from ._journal import DEFAULT_LEASE
from ._journal_file import SYNCHRONOUS_LEVELS

if TYPE_CHECKING:
    from ._events import TaskEvent

DEFAULT_GRACE_PERIOD = 10.0
"""Seconds a shutdown waits for running tasks before it cancels them.

Long enough for typical follow-up work (an e-mail, a webhook), short enough to fit
inside a container platform's usual 30 s termination window, after Hypercorn's own
``graceful_timeout`` (3 s) for in-flight requests.
"""

DEFAULT_SYNCHRONOUS = "normal"
"""The journal's SQLite ``synchronous`` level. In WAL mode ``normal`` keeps every commit
through any crash of the process (``kill -9``, an OOM kill, a crashed server) and a
clean reboot; only a power cut or an OS crash may lose the last commits. ``full`` syncs
each commit to the disk, for that too, at a price: on this project's benchmark machine
a sync per group commit costs about a fifth of the requests per second (README,
Benchmarks). SQLite recommends ``normal`` with WAL for most applications."""

DEFAULT_THREAD_LIMIT = 40
"""Worker threads for plain-function tasks: trio's default number, in a pool of our own."""

DEFAULT_MAX_RUNNING = 1_000
"""Tasks running at once (async and thread tasks together); the rest wait as pending."""

DEFAULT_MAX_PENDING = 10_000
"""Tasks waiting for a running slot; past it `add_task` raises `Overloaded`."""

ErrorHook = Callable[[str, BaseException], object]
"""``on_error(task_name, exception)``, called when a background task raises."""

EventHook = Callable[["TaskEvent"], object]
"""``on_event(event)``, called at each step of every task's life."""


class NurseryOptions(TypedDict, total=False):
    """Keyword options of `open_background_nursery`, the middleware and `serve`."""

    grace_period: float
    thread_limit: int
    max_running: int
    max_pending: int
    on_error: ErrorHook | None
    on_event: EventHook | None
    tracing: bool
    journal: str | os.PathLike[str] | None
    journal_lease: float
    journal_synchronous: str
    streaq: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Validated `NurseryOptions`, with their defaults filled in."""

    grace_period: float = DEFAULT_GRACE_PERIOD
    thread_limit: int = DEFAULT_THREAD_LIMIT
    max_running: int = DEFAULT_MAX_RUNNING
    max_pending: int = DEFAULT_MAX_PENDING
    on_error: ErrorHook | None = None
    on_event: EventHook | None = None
    tracing: bool = False
    journal: str | os.PathLike[str] | None = None
    journal_lease: float = DEFAULT_LEASE
    journal_synchronous: str = DEFAULT_SYNCHRONOUS
    streaq: Any = None  # a streaq Worker (streaq is an optional dependency)

    @classmethod
    def from_options(cls, options: NurseryOptions) -> Settings:
        """Check ``options`` (unknown names included) and fill in the defaults."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(sorted(known))}"
            )
        return cls(**options)

    def __post_init__(self) -> None:
        grace = self.grace_period
        if isinstance(grace, bool) or not isinstance(grace, int | float):
            raise TypeError(f"grace_period must be a number of seconds, not {grace!r}")
        if not (grace >= 0 and math.isfinite(grace)):
            raise ValueError(f"grace_period must be finite and >= 0, not {grace!r}")
        _check_count("thread_limit", self.thread_limit, minimum=1)
        _check_count("max_running", self.max_running, minimum=1)
        _check_count("max_pending", self.max_pending, minimum=0)
        if not isinstance(self.tracing, bool):
            raise TypeError(f"tracing must be True or False, not {self.tracing!r}")
        if self.tracing:
            from . import _tracing  # noqa: F401 -- an ImportError naming the extra, now
        self._check_journal()
        if self.streaq is not None:
            from .streaq import check_worker  # (imports streaq: only when asked for)

            check_worker(self.streaq)

        for name in ("on_error", "on_event"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable, not {hook!r}")
            if is_async_callable(hook):
                # Called synchronously in trio's thread, a coroutine would never run.
                raise TypeError(
                    f"{name} must be a plain function, not an async one: hooks are called "
                    f"synchronously in trio's thread, so {name_of(hook)}() would never run. "
                    f"Record what you need in the hook; for async work, start a task "
                    f"(BackgroundNursery.start_soon) from it"
                )

    def _check_journal(self) -> None:
        journal = self.journal
        if journal is not None:
            if not isinstance(journal, str | os.PathLike) or not os.fspath(journal):
                raise TypeError(f"journal must be a file path (or ':memory:'), not {journal!r}")
            # The path itself is checked when the journal opens, at startup.
            object.__setattr__(self, "journal", os.fspath(journal))
        lease = self.journal_lease
        if isinstance(lease, bool) or not isinstance(lease, int | float):
            raise TypeError(f"journal_lease must be a number of seconds, not {lease!r}")
        if not (lease >= 1 and math.isfinite(lease)):
            raise ValueError(f"journal_lease must be finite and >= 1, not {lease!r}")
        if self.journal_synchronous not in SYNCHRONOUS_LEVELS:
            raise ValueError(
                f"journal_synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, "
                f"not {self.journal_synchronous!r}"
            )


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")
