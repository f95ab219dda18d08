"""trio_bg: background tasks for trio ASGI apps.

Tasks collected during a request run after its response, in one server-scoped
nursery; shutdown drains them for a grace period, cancels the rest, and reports
what happened to every one.
"""

from ._engine.calls import Backoff, task
from ._engine.events import TaskEvent
from ._engine.report import ShutdownReport, TaskStats
from ._engine.status import TaskHandle, TaskStatus
from ._errors import HandoffError, JournalError, NurseryClosed, Overloaded
from ._keeping.journal import lease_held
from ._running.nursery import BackgroundNursery, open_background_nursery
from ._running.options import DEFAULT_GRACE_PERIOD, NurseryOptions
from ._web.collection import BackgroundTasks, current_tasks
from ._web.middleware import BackgroundTaskMiddleware
from ._web.serve import serve
from ._web.task_lookup import cancel_task, set_progress, task_status, wait_task

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "BackgroundNursery",
    "BackgroundTaskMiddleware",
    "BackgroundTasks",
    "Backoff",
    "HandoffError",
    "JournalError",
    "NurseryClosed",
    "NurseryOptions",
    "Overloaded",
    "ShutdownReport",
    "TaskEvent",
    "TaskHandle",
    "TaskStats",
    "TaskStatus",
    "cancel_task",
    "current_tasks",
    "lease_held",
    "open_background_nursery",
    "serve",
    "set_progress",
    "task",
    "task_status",
    "wait_task",
]
