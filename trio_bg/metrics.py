"""Prometheus metrics to mount: ``GET`` answers the serving nursery's task counts, run
and wait times, live counts and journal backlog, by ``prometheus_client`` (the optional
extra ``trio-bg[prometheus]``). See docs/metrics.md for each metric."""

from __future__ import annotations

from ._web.metrics_endpoint import app

__all__ = ["app"]
