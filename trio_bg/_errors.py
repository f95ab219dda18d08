"""The exceptions a nursery raises to the code that gives it work, and the errors for
a task that nothing here can keep (a durable one without a journal, a remote one
without its streaq worker)."""

from __future__ import annotations


class Overloaded(RuntimeError):
    """The background nursery cannot take this task now: it is full, or shutting down.

    Raised by ``add_task`` / ``start_soon`` in the request handler, so the app can still
    answer; when it escapes an ASGI app before the response started,
    `BackgroundTaskMiddleware` answers ``503 Service Unavailable`` with ``Retry-After``.
    """


class NurseryClosed(Overloaded):
    """The background nursery is shutting down (or has shut down) and takes no new tasks."""


class JournalError(Exception):
    """The journal of durable tasks cannot be used: a bad path, a file that is not a
    journal (or a newer one), a corrupt, locked or full database. At startup the
    lifespan fails with it; during a request, the response becomes a 503 (or, already
    streaming, is aborted) and its tasks are discarded."""


class HandoffError(Exception):
    """Remote tasks could not be handed to their task engine (Redis unreachable, or too
    slow to answer). At startup the lifespan fails with it; during a request, the
    response becomes a 503 (or, already streaming, is aborted): a failed hand-off never
    looks like success. ``in_doubt`` is True when the tasks reached Redis but its answer
    did not come back (a stall, a connection lost mid-way): Redis may have them and a
    worker may run them, so they are counted ``unconfirmed``, never ``discarded``."""

    def __init__(self, message: str, *, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt


def needs_a_journal(name: str, where: str) -> RuntimeError:
    """The error for a durable task added where no journal keeps it."""
    return RuntimeError(
        f"{name} is a durable task, and {where}: configure one with "
        f"journal='path/tasks.db' (BackgroundTaskMiddleware, trio_bg.serve, "
        f"open_background_nursery, the integrations; --journal on the command line), "
        f"or journal=':memory:' in tests"
    )


def needs_a_handoff(name: str, where: str) -> RuntimeError:
    """The error for a remote task added where nothing hands it to its worker."""
    return RuntimeError(
        f"{name} is a streaq task, and {where}: give its worker to the nursery with "
        f"streaq=worker (BackgroundTaskMiddleware, trio_bg.serve, open_background_nursery, "
        f"the integrations)"
    )
