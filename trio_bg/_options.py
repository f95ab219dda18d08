"""The options a background nursery takes, checked once, up front."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypedDict

DEFAULT_GRACE_PERIOD = 10.0
"""Seconds a shutdown waits for running tasks before it cancels them.

Long enough for typical follow-up work (an e-mail, a webhook), short enough to fit
inside a container platform's usual 30 s termination window, after Hypercorn's own
``graceful_timeout`` (3 s) for in-flight requests.
"""

DEFAULT_THREAD_LIMIT = 40
"""Worker threads for plain-function tasks: trio's default, but a limiter of our own."""

ErrorHook = Callable[[str, BaseException], object]
"""``on_error(task_name, exception)``, called when a background task raises."""


class NurseryOptions(TypedDict, total=False):
    """Keyword options of `open_background_nursery`, the middleware and `serve`."""

    grace_period: float
    thread_limit: int
    on_error: ErrorHook | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Validated `NurseryOptions`, with their defaults filled in."""

    grace_period: float = DEFAULT_GRACE_PERIOD
    thread_limit: int = DEFAULT_THREAD_LIMIT
    on_error: ErrorHook | None = None

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
        limit = self.thread_limit
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"thread_limit must be an int, not {limit!r}")
        if limit < 1:
            raise ValueError(f"thread_limit must be >= 1, not {limit!r}")
        if self.on_error is not None and not callable(self.on_error):
            raise TypeError(
                f"on_error must be callable as on_error(name, exc), not {self.on_error!r}"
            )
