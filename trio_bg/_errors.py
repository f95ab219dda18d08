"""The exceptions a nursery raises to the code that gives it work."""

from __future__ import annotations


class Overloaded(RuntimeError):
    """The background nursery cannot take this task now: it is full, or shutting down.

    Raised by ``add_task`` / ``start_soon`` in the request handler, so the app can still
    answer; when it escapes an ASGI app before the response started,
    `BackgroundTaskMiddleware` answers ``503 Service Unavailable`` with ``Retry-After``.
    """


class NurseryClosed(Overloaded):
    """The background nursery is shutting down (or has shut down) and takes no new tasks."""
