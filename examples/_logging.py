"""Show the examples' log lines (and trio_bg's drain report) under Hypercorn's CLI."""

from __future__ import annotations

import logging


def show_logs(*logger_names: str) -> None:
    """Send INFO lines of ``trio_bg`` and ``logger_names`` to stderr.

    Hypercorn's CLI sets up its own ``hypercorn.*`` loggers only. A handler on the
    root logger would print Hypercorn's lines a second time, so the handler goes on
    these loggers, and only when nobody has configured logging already.
    """
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(name)s: %(message)s"))
    for name in ("trio_bg", *logger_names):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
