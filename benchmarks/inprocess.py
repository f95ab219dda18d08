"""Running one in-process measurement: a fresh ``trio.run`` after a full collection."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def fresh_run(measure: Callable[[int], Awaitable[T]], tasks: int, *, gc_paused: bool = False) -> T:
    """``trio.run(measure, tasks)``; with ``gc_paused`` the cyclic GC is off during it
    (to tell the collector's share of a cost from the rest)."""
    gc.collect()
    if gc_paused:
        gc.disable()
    try:
        return trio.run(measure, tasks)
    finally:
        gc.enable()
