"""The options a background nursery takes, checked once, up front (see `option_table`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, TypedDict

from .option_table import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_RUNNING,
    DEFAULT_SYNCHRONOUS,
    DEFAULT_THREAD_LIMIT,
    NURSERY_OPTIONS,
    ErrorHook,
    EventHook,
)

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_RUNNING",
    "DEFAULT_SYNCHRONOUS",
    "DEFAULT_THREAD_LIMIT",
    "ErrorHook",
    "EventHook",
    "NurseryOptions",
    "Settings",
]


# Written out for type checkers; a test holds it to `_option_table.NURSERY_OPTIONS`.
class NurseryOptions(TypedDict, total=False):
    """Keyword options of `open_background_nursery`, the middleware and `serve`."""

    grace_period: float
    thread_limit: int
    max_running: int
    max_pending: int
    statuses_kept: int
    statuses_kept_for: float
    on_error: ErrorHook | None
    on_event: EventHook | None
    tracing: bool
    journal: str | os.PathLike[str] | None
    journal_lease: float
    journal_synchronous: str
    journal_statuses_kept_for: float
    streaq: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Validated `NurseryOptions`, with their defaults filled in."""

    grace_period: float
    thread_limit: int
    max_running: int
    max_pending: int
    statuses_kept: int
    statuses_kept_for: float
    on_error: ErrorHook | None
    on_event: EventHook | None
    tracing: bool
    journal: str | os.PathLike[str] | None
    journal_lease: float
    journal_synchronous: str
    journal_statuses_kept_for: float
    streaq: Any  # a streaq Worker (streaq is an optional dependency)

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
        values: dict[str, Any] = {option.name: option.default for option in NURSERY_OPTIONS}
        values.update(options)
        return cls(**values)

    def __post_init__(self) -> None:
        for option in NURSERY_OPTIONS:
            if option.check is not None:
                value = option.check(option.name, getattr(self, option.name))
                object.__setattr__(self, option.name, value)
