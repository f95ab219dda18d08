"""The exceptions a nursery raises to the code that gives it work."""

from __future__ import annotations


class NurseryClosed(RuntimeError):
    """The background nursery is shutting down (or has shut down) and takes no new tasks."""
