"""The command line, ``python -m trio_bg``: ``serve`` an ASGI app, or ``drill`` its shutdown."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config

from ._asgi import ASGIApp, BackgroundTaskMiddleware
from ._options import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_RUNNING,
    DEFAULT_THREAD_LIMIT,
    NurseryOptions,
)
from ._report import ShutdownReport
from ._serve import SHUTDOWN_MARGIN, default_config, serve, wrap

EXIT_OK = 0
EXIT_CUT_SHORT = 1
EXIT_USAGE = 2
EXIT_SERVER_FAILED = 3

SERVE_EPILOG = f"""\
exit status:
  {EXIT_OK}  every accepted background task finished on its own: completed, failed
     or timed out (failures are logged; they are the tasks' outcome, not the drain's)
  {EXIT_CUT_SHORT}  the shutdown cut tasks short: cancelled or abandoned after the grace
     period (or a second signal); the log and the report name each one
  {EXIT_USAGE}  usage error: a bad option, or the app cannot be loaded
  {EXIT_SERVER_FAILED}  the server failed: it could not bind, the app's startup failed, ...

SIGTERM or SIGINT (Ctrl+C) starts a graceful shutdown: stop listening, give in-flight
requests --graceful-timeout seconds, then the background tasks --grace-period seconds.
A second signal cancels the background tasks at once.
"""

DRILL_EPILOG = """\
The drill starts `python -m trio_bg serve APP` on 127.0.0.1 (a free port), sends up to
--requests GET / requests at --rate from --concurrency clients, sends the server SIGTERM
after --signal-after seconds (or once every request was sent; none starts after it),
waits for the server to exit, and reads its shutdown report. Then it checks the books:
every accepted task ended completed, failed, timed out, cancelled or abandoned, and
every answered request had its tasks accepted. For the latter the app sets the response
header `x-trio-bg-tasks: N`, N being the number of tasks that request added (as
examples/drill_app.py does); without it that check is skipped, and the drill says so.

exit status:
  0  the books balance and the server stopped within --deadline
  1  tasks are unaccounted for, or the server failed or did not stop in time
  2  usage error
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve_command(parser, args)
    try:
        from ._drill import DrillPlan, drill  # needs httpx, which serving does not
    except ModuleNotFoundError as error:
        if error.name != "httpx":
            raise
        parser.error("the drill needs httpx: pip install 'trio-bg[drill]'")

    return drill(
        DrillPlan(
            app=args.app,
            requests=args.requests,
            concurrency=args.concurrency,
            rate=args.rate,
            signal_after=args.signal_after,
            grace_period=args.grace_period,
            graceful_timeout=args.graceful_timeout,
            max_running=args.max_running,
            max_pending=args.max_pending,
            deadline=args.deadline,
        ),
        json_output=args.json,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_bg",
        description="Serve an ASGI app with trio_bg's background tasks, or drill its shutdown.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve",
        help="serve an ASGI app with Hypercorn's trio worker and BackgroundTaskMiddleware",
        description="Serve an ASGI app with Hypercorn (trio) and BackgroundTaskMiddleware.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_parser.add_argument("app", help="the app to serve, as module:attribute")
    serve_parser.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help="where to listen (repeatable; default 127.0.0.1:8000)",
    )
    _add_nursery_options(serve_parser)
    serve_parser.add_argument(
        "--thread-limit",
        type=_positive_int,
        metavar="N",
        help=f"worker threads for plain-function tasks (default {DEFAULT_THREAD_LIMIT})",
    )
    serve_parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level on stderr (default info)",
    )
    serve_parser.add_argument(
        "--report-json",
        type=Path,
        metavar="PATH",
        help="write the shutdown report there as JSON (the fields of trio_bg.ShutdownReport)",
    )

    drill_parser = commands.add_parser(
        "drill",
        help="rehearse a graceful shutdown under load and check that every task is accounted for",
        description="Rehearse a graceful shutdown of an ASGI app under load.",
        epilog=DRILL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    drill_parser.add_argument("app", help="the app to drill, as module:attribute")
    drill_parser.add_argument(
        "--requests",
        type=_positive_int,
        default=400,
        metavar="N",
        help="requests to send at most (default 400)",
    )
    drill_parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="C",
        help="concurrent clients (default 10)",
    )
    drill_parser.add_argument(
        "--rate",
        type=_non_negative_float,
        default=100.0,
        metavar="R",
        help="requests per second, all clients together; 0: as fast as they go (default 100)",
    )
    drill_parser.add_argument(
        "--signal-after",
        type=_non_negative_float,
        default=2.0,
        metavar="S",
        help="seconds of load before SIGTERM, or less if every request was sent (default 2)",
    )
    _add_nursery_options(drill_parser)
    drill_parser.add_argument(
        "--deadline",
        type=_positive_float,
        metavar="S",
        help="seconds the server may take to stop after SIGTERM before it is killed and the "
        f"drill fails (default: graceful timeout + grace period + {SHUTDOWN_MARGIN:g}; pass it "
        "for an app wrapped in code with a grace period over "
        f"{DEFAULT_GRACE_PERIOD:g})",
    )
    drill_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _add_nursery_options(parser: argparse.ArgumentParser) -> None:
    """The options both commands pass on to the middleware and to Hypercorn (only those
    given: an app that is already a BackgroundTaskMiddleware takes none)."""
    parser.add_argument(
        "--grace-period",
        type=_non_negative_float,
        metavar="S",
        help="seconds the shutdown waits for background tasks "
        f"(default {DEFAULT_GRACE_PERIOD:g}, or what an app wrapped in code was given)",
    )
    parser.add_argument(
        "--max-running",
        type=_positive_int,
        metavar="N",
        help=f"background tasks running at once (default {DEFAULT_MAX_RUNNING})",
    )
    parser.add_argument(
        "--max-pending",
        type=_non_negative_int,
        metavar="N",
        help=f"tasks waiting for a slot before requests get 503 (default {DEFAULT_MAX_PENDING})",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=_non_negative_float,
        metavar="S",
        help="seconds in-flight requests get at shutdown (Hypercorn's; default 3)",
    )


# -- serve ---------------------------------------------------------------------------


def _serve_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    options = NurseryOptions()  # only those given: an app that is already wrapped takes none
    if args.grace_period is not None:
        options["grace_period"] = args.grace_period
    if args.thread_limit is not None:
        options["thread_limit"] = args.thread_limit
    if args.max_running is not None:
        options["max_running"] = args.max_running
    if args.max_pending is not None:
        options["max_pending"] = args.max_pending
    try:
        loaded = _load_app(args.app)
    except LookupError as error:
        parser.error(str(error))  # exits with status 2
    except Exception:  # the app's module raised on import: show where
        logging.getLogger("trio_bg").exception("cannot load %s", args.app)
        return EXIT_USAGE
    if isinstance(loaded, BackgroundTaskMiddleware) and options:
        flags = ", ".join("--" + name.replace("_", "-") for name in options)
        parser.error(
            f"{args.app} is already a BackgroundTaskMiddleware, so {flags} cannot apply: "
            f"set those options where it is created, or serve the unwrapped app"
        )
    try:
        app = wrap(loaded, options)
    except (TypeError, ValueError) as error:  # an option the middleware refuses
        parser.error(str(error))

    config = _config(args, app)
    try:
        report = trio.run(partial(serve, app, config))
    except Exception as error:
        logger = logging.getLogger("trio_bg")
        errors = _leaves(error)
        if all(isinstance(leaf, OSError) for leaf in errors):  # no traceback for "port in use"
            logger.error("the server failed: %s", "; ".join(map(str, errors)))
        else:
            logger.exception("the server failed")
        return EXIT_SERVER_FAILED
    if args.report_json is not None:
        _write_json(args.report_json, dataclasses.asdict(report))
    return _exit_status(report)


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in ``error``, nested groups flattened (Hypercorn nests them)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _load_app(spec: str) -> ASGIApp:
    """Import ``module:attribute`` (attribute defaults to ``app``), with the current
    directory on ``sys.path`` as Hypercorn does."""
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "app"
    if not module_name:
        raise LookupError(f"cannot load {spec!r}: give the app as module:attribute")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name and not module_name.startswith(f"{error.name}."):
            raise  # a module the app's own code imports is missing: show the traceback
        raise LookupError(f"cannot load {spec!r}: no module named {error.name!r}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LookupError(f"cannot load {spec!r}: {module_name} has no {attribute!r}") from None
    if not callable(target):
        raise LookupError(f"cannot serve {spec!r}: it is {type(target).__name__}, not an ASGI app")
    return target  # callable; that it speaks ASGI is the user's promise


def _config(args: argparse.Namespace, app: BackgroundTaskMiddleware) -> Config:
    config = default_config(app.grace_period)
    if args.bind:
        config.bind = args.bind
    # Hypercorn's log lines go through logging too, to the one handler set up above
    # (a logger object here stops Hypercorn from adding a handler of its own).
    config.errorlog = logging.getLogger("hypercorn.error")
    if args.graceful_timeout is not None:
        config.graceful_timeout = args.graceful_timeout
    return config


def _exit_status(report: ShutdownReport) -> int:
    if report.cancelled or report.abandoned:
        print(
            f"trio_bg: {report.cancelled + report.abandoned} background task(s) cut short by "
            f"the shutdown: {report}",
            file=sys.stderr,
        )
        return EXIT_CUT_SHORT
    print(f"trio_bg: every background task finished: {report}", file=sys.stderr)
    return EXIT_OK


def _write_json(path: Path, data: object) -> None:
    """Write ``data`` to ``path`` whole or not at all (a reader never sees half a file)."""
    partial_path = path.with_name(path.name + ".partial")
    partial_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    partial_path.replace(path)


# -- argument types ------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value
