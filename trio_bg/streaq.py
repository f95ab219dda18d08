"""Hand tasks to streaq workers over Redis: the same ``add_task``, run on other machines.

Register tasks on a worker made by `worker` and give the worker to the nursery::

    import trio_bg, trio_bg.streaq

    tasks = trio_bg.streaq.worker("redis://redis.internal:6379")

    @tasks.task(name="emails.welcome")
    async def send_welcome(address: str) -> None: ...

    app = trio_bg.BackgroundTaskMiddleware(app, streaq=tasks)

A handler's ``current_tasks().add_task(send_welcome, "a@example.com")`` then sends the
task to Redis before the response's body goes out (a 503 if Redis cannot take it),
and ``python -m trio_bg worker myapp.tasks:tasks`` runs it, on trio. Every other task
still runs in the process's own nursery.

streaq's tasks run at least once: a worker that dies mid-task leaves it to another
worker, which runs it again. Make remote tasks idempotent (README, Remote tasks).
"""

from __future__ import annotations

from ._keeping.streaq_worker import DEFAULT_GRACE_PERIOD, DEFAULT_IDLE_TIMEOUT, check_worker, worker

__all__ = ["DEFAULT_GRACE_PERIOD", "DEFAULT_IDLE_TIMEOUT", "check_worker", "worker"]
