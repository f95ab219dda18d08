"""A remote task's progress, from the worker that runs it to the web processes: what
`trio_bg.set_progress` says inside a streaq task is written to Redis (the latest only,
one write at a time), and read back with the task's status."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import trio

logger = logging.getLogger("trio_bg")

KEY = "trio_bg:progress:"
"""After the worker's prefix, then the task id: the task's progress, as JSON."""

KEPT_FOR = 3600
"""Seconds Redis keeps a task's last progress."""


class ProgressWriter:
    """Writes one running remote task's progress to Redis: `set_progress` only records
    it (in trio's thread, or the worker thread of a plain function); a trio task of the
    run's writes the latest. Made in trio's thread, as the task starts."""

    __slots__ = ("_key", "_latest", "_redis", "_thread", "_token", "_writing")

    def __init__(self, worker: Any, task_id: str) -> None:
        self._redis = worker.redis
        self._key = worker.prefix + KEY + task_id
        self._latest: tuple[float | None, str | None] | None = None
        self._writing = False
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()

    def __call__(self, fraction: float | None, message: str | None) -> None:
        self._latest = (fraction, message)
        if threading.get_ident() == self._thread:
            self._start_writing()
        else:
            self._token.run_sync_soon(self._start_writing)

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            trio.lowlevel.spawn_system_task(self._write, name="trio_bg progress")

    async def _write(self) -> None:
        try:
            while self._latest is not None:
                (fraction, message), self._latest = self._latest, None
                data = json.dumps({"progress": fraction, "message": message})
                await self._redis.set(self._key, data, ex=KEPT_FOR)
        except Exception as error:  # progress is a courtesy: never the task's failure
            logger.warning("could not write a remote task's progress to Redis: %r", error)
        finally:
            self._writing = False


async def read_progress(worker: Any, task_id: str) -> tuple[float | None, str | None]:
    """The progress a remote task last set, (None, None) if none."""
    raw = await worker.redis.get(worker.prefix + KEY + task_id)
    if raw is None:
        return None, None
    data = json.loads(raw)
    return data.get("progress"), data.get("message")
