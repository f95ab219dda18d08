"""The ASGI apps the HTTP benchmarks serve, one per (framework, task) pair.

Hypercorn loads them as ``benchmarks.apps:build('starlette', 'sleep')``. Every app
answers ``GET /`` with the same status, headers and body, and ``GET /count`` with
the counts the harness checks (see `counting`).
"""

from __future__ import annotations

from typing import Unpack

from trio_bg import NurseryOptions

from . import raw
from .counting import TASKS, ASGIApp

RAW_MODES: dict[str, raw.Mode] = {
    "bare": "bare",
    "raw+nursery": "nursery",
    "raw+threads": "threads",
    "raw+trio_bg": "trio_bg",
}
FRAMEWORKS = (*RAW_MODES, "starlette", "starlette+trio_bg", "quart", "quart+trio_bg")


def build(framework: str, task: str, **options: Unpack[NurseryOptions]) -> ASGIApp:
    """The app for ``framework`` adding one ``task`` (a key of `TASKS`, or "none") per
    request. Starlette and Quart are imported only when asked for. ``options`` go to
    the raw app's middleware: ``build('raw+trio_bg', 'durable', journal='/tmp/…/tasks.db')``.
    """
    if task != "none" and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from none, {', '.join(TASKS)}")
    if framework in RAW_MODES:
        return raw.build(task, mode=RAW_MODES[framework], **options)
    if options:
        raise ValueError(f"options are taken by the raw apps only, not by {framework}")
    if framework in ("starlette", "starlette+trio_bg"):
        from . import starlette_app

        return starlette_app.build(task, middleware=framework == "starlette+trio_bg")
    if framework in ("quart", "quart+trio_bg"):
        from . import quart_app

        return quart_app.build(task, middleware=framework == "quart+trio_bg")
    raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")
