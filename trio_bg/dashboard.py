"""A live dashboard of the background tasks, to mount in your app: counts and rates,
running, pending and ended tasks, times by name, dead letters, with cancel, retry and
purge (see docs/dashboard.md)."""

from __future__ import annotations

from ._web.dashboard_app import app

__all__ = ["app"]
