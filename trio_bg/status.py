"""A status endpoint to mount: ``GET /{id}`` answers a task's `TaskStatus` as JSON, so a
request can answer ``202 Accepted`` with a ``Location`` there."""

from __future__ import annotations

from ._web.status_endpoint import app

__all__ = ["app"]
