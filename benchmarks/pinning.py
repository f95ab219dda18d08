"""CPU pinning: the server on one core, the load generator on another."""

from __future__ import annotations

import os
import shutil

SERVER_CPU = 0
LOAD_CPU = 1


def can_pin() -> bool:
    """Whether there are two cores to keep apart and ``taskset`` to do it."""
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


def cpus() -> tuple[int | None, int | None]:
    """The (server, load generator) CPUs, or (None, None) when not pinning."""
    if not can_pin():
        return None, None
    available = sorted(os.sched_getaffinity(0))
    return available[SERVER_CPU], available[LOAD_CPU]


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """``command`` run under ``taskset -c cpu`` (unchanged when ``cpu`` is None)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]
