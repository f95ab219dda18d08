"""A small FastAPI app and its test suite, written as a FastAPI user writes them, in the
image of a real one: a SQLite session dependency with ``yield`` (committed at its exit),
background tasks that send "emails" and write through the request's session, ``with
TestClient(app)`` fixtures and ``patch("fastapi.BackgroundTasks.add_task")`` tests.

Nothing here knows about trio_bg but the one install line in ``app.py``: the suite passes
on plain FastAPI without it (issue 19: a real app's suite passes unchanged with it).
"""
