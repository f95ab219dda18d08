"""The engine: what a task is and how one runs (the task record, its checked call, its
threads, its spans, the records of its life). No SQL, no Redis, no ASGI."""
