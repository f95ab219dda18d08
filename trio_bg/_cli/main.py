"""The command line, ``python -m trio_bg``: ``serve`` an ASGI app, or ``drill`` its shutdown;
run a streaq ``worker``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config

from .._engine.report import ShutdownReport
from .._running.nursery import fatal
from .._running.option_table import DRILL_FLAGS, FLAGS, OPTIONS_BY_NAME, add_flags, given_flags
from .._running.options import NurseryOptions
from .._running.values import (
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    bind_address,
    check_journal_path,
    leaves,
    load_attribute,
    positive_int,
)
from .._running.worker_numbers import SharedNumbers, share_numbers
from .._web.middleware import (
    ASGIApp,
    BackgroundTaskMiddleware,
    lifespan_failure,
    report_if_any,
)
from .._web.serve import default_config, serve, serve_worker, wrap
from .drill_command import add_drill_parser, drill_command
from .journal_command import add_journal_parser, journal_command
from .supervisor import WorkerExit, combined, describe_exit, supervise
from .worker_command import WorkerRefused, add_worker_parser, load_streaq_worker, worker_command

EXIT_CUT_SHORT = 1
EXIT_SERVER_FAILED = 3

NOTHING_ACCEPTED = ShutdownReport(
    accepted=0,
    completed=0,
    failed=0,
    timed_out=0,
    cancelled=0,
    abandoned=0,
    discarded=0,
    unfinished=(),
    duration=0.0,
)
"""The report of a nursery that could not start."""

SERVE_EPILOG = f"""\
exit status:
  {EXIT_OK}  every accepted background task finished on its own: completed, failed
     or timed out (failures are logged; they are the tasks' outcome, not the drain's)
  {EXIT_CUT_SHORT}  the shutdown cut tasks short: cancelled or abandoned after the grace
     period (or a second signal); the log and the report name each one. Also when
     Redis lost remote tasks that no journal kept (maybe_lost in the report)
  {EXIT_USAGE}  usage error: a bad option, the app cannot be loaded or is not an ASGI 3
     app, the --streaq worker cannot be loaded or is refused, the --report-json path is
     not writable
  {EXIT_SERVER_FAILED}  the server failed: it could not bind, the app's lifespan failed, the
     background nursery could not start (the journal or Redis), the report could not
     be written (the report, when written, says why in "failure"); with --workers: a
     worker failed to start, died, or left no report (its tasks are unaccounted for)
  With --workers the worst status of any worker wins (3 over 1 over 0).

SIGTERM or SIGINT (Ctrl+C) starts a graceful shutdown: stop listening, give in-flight
requests --graceful-timeout seconds, then the background tasks --grace-period seconds.
A second signal cancels the background tasks at once.

With --workers N (N >= 2) this process binds the sockets and runs N worker processes
that share them. A signal to it, or to its whole process group (Ctrl+C, kill -TERM
-PGID, systemd's KillMode=control-group), stops every worker gracefully; a second
signal cancels their background tasks. It waits for every worker's drain, then reports
each worker and the total; --report-json gets the total's fields plus "workers", one
object per worker process: pid, exit_status (negative: killed by that signal), and
report (null: it left none). A worker that dies while serving is logged and replaced
(not if it dies within a second of its start, or before it serves: the server stops).
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve_command(parser, args)
    if args.command == "journal":
        return journal_command(args)
    if args.command == "worker":
        return worker_command(args)
    return drill_command(parser, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_bg",
        description="Serve an ASGI app with trio_bg's background tasks, or drill its shutdown.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = add_command(
        commands,
        "serve",
        "serve an ASGI app with Hypercorn's trio worker and BackgroundTaskMiddleware",
        "Serve an ASGI app with Hypercorn (trio) and BackgroundTaskMiddleware.",
        SERVE_EPILOG,
    )
    serve_parser.add_argument("app", help="the app to serve, as module:attribute")
    serve_parser.add_argument(
        "--bind",
        action="append",
        type=bind_address,
        metavar="HOST:PORT",
        help="where to listen (repeatable; default 127.0.0.1:8000)",
    )
    add_flags(serve_parser, DRILL_FLAGS)
    add_flags(
        serve_parser,
        tuple(
            OPTIONS_BY_NAME[name]
            for name in (
                "thread_limit",
                "statuses_kept",
                "statuses_kept_for",
                "journal_statuses_kept_for",
            )
        ),
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
    serve_parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="worker processes; from 2, run them under a supervisor in this process "
        "(default 1: serve in this process)",
    )
    add_flags(serve_parser, (OPTIONS_BY_NAME["streaq"],))
    # A worker of --workers: commands from the supervisor on stdin (see serve_worker).
    serve_parser.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)

    add_drill_parser(commands)
    add_journal_parser(commands)
    add_worker_parser(commands)
    return parser


# -- serve ---------------------------------------------------------------------------


def _serve_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.supervised:
        # Until serve_worker takes them over: the supervisor got the signal too (Ctrl+C,
        # kill -TERM -PGID), and its stop command waits on stdin meanwhile.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if args.report_json is not None and (problem := _unwritable(args.report_json)):
        parser.error(f"--report-json {args.report_json}: {problem}")
    check_journal_path(parser, args)
    given: dict[str, Any] = {}  # only those given: an app that is already wrapped takes none
    for option in FLAGS:
        value = getattr(args, option.name)
        if option.nursery and option.name != "streaq" and value is not None:
            given[option.name] = value
    options = cast("NurseryOptions", given)
    try:
        loaded = _load_app(args.app)
    except LookupError as error:
        parser.error(str(error))  # exits with status 2
    except Exception:  # the app's module raised on import: show where
        logging.getLogger("trio_bg").exception("cannot load %s", args.app)
        return EXIT_USAGE
    if args.streaq is not None:
        try:
            options["streaq"] = load_streaq_worker(args.streaq)
        except (LookupError, WorkerRefused) as error:
            parser.error(f"--streaq: {error}")
        except Exception as error:
            if isinstance(error, ModuleNotFoundError) and error.name == "streaq":
                parser.error("--streaq needs streaq: pip install 'trio-bg[streaq]'")
            logging.getLogger("trio_bg").exception("cannot load %s", args.streaq)
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
    if args.workers > 1:
        return _supervise_command(args, config)
    # Besides the report: why the server failed, when the app or a task made it fail
    # (both were logged already, with their tracebacks).
    failure: str | None = None
    try:
        if args.supervised:
            report = trio.run(_serve_worker, app, config)
        else:
            report = trio.run(serve, app, config)
    except (KeyboardInterrupt, SystemExit) as stop:
        if not _raised_by_a_task(app, stop):
            raise  # as Python would
        failure, report = f"a background task raised {stop!r}", app.report
    except Exception as error:
        if lifespan_failure(app) is None:
            return _server_failed(error)
        # Hypercorn raises for a failed startup: what the nursery saw is reported still
        # (nothing, if it could not start).
        failure, report = lifespan_failure(app), report_if_any(app) or NOTHING_ACCEPTED
    else:
        if (shutdown_failure := lifespan_failure(app)) is not None:
            failure = shutdown_failure  # a failed shutdown: Hypercorn drops it
    data = dataclasses.asdict(report) | ({"failure": failure} if failure else {})
    written = args.report_json is None or _write_report(args.report_json, data)
    if failure is not None:
        print(f"trio_bg: the server failed: {failure}; background tasks: {report}", file=sys.stderr)
        return EXIT_SERVER_FAILED
    # A worker's supervisor reports it, with its pid.
    status = _status(report) if args.supervised else _exit_status(report)
    return status if written else EXIT_SERVER_FAILED


async def _serve_worker(app: BackgroundTaskMiddleware, config: Config) -> ShutdownReport:
    """`serve_worker`, sharing the worker's numbers with the others' metrics meanwhile
    (a system task: cancelled, silently, when the run ends)."""
    if (shared := SharedNumbers.from_environment()) is not None:
        trio.lowlevel.spawn_system_task(share_numbers, lambda: app.nursery, shared)
    return await serve_worker(app, config)


def _raised_by_a_task(app: BackgroundTaskMiddleware, stop: BaseException) -> bool:
    try:
        return stop is fatal(app.nursery)
    except RuntimeError:  # no nursery: it never started
        return False


def _supervise_command(args: argparse.Namespace, config: Config) -> int:
    command = _worker_command(args)
    try:
        exits = trio.run(partial(supervise, command, config, args.workers, name=args.app))
    except Exception as error:
        return _server_failed(error)
    for worker in exits:
        outcome = "no report: its tasks are unaccounted for"
        if worker.report is not None:
            outcome = str(worker.report)
        print(
            f"trio_bg: worker {worker.pid} ({describe_exit(worker.exit_status)}): {outcome}",
            file=sys.stderr,
        )
    total = combined(exits)
    data = dataclasses.asdict(total) | {"workers": [dataclasses.asdict(w) for w in exits]}
    written = args.report_json is None or _write_report(args.report_json, data)
    if failed := [worker for worker in exits if not _accounted_for(worker)]:
        print(
            f"trio_bg: {len(failed)} of {len(exits)} worker(s) failed, their tasks "
            f"unaccounted for; the others: {total}",
            file=sys.stderr,
        )
        return EXIT_SERVER_FAILED
    status = _exit_status(total)
    return status if written else EXIT_SERVER_FAILED


def _worker_command(args: argparse.Namespace) -> list[str]:
    """A worker's command line: the app and the options given; the supervisor adds the
    sockets and the report path."""
    command = [sys.executable, "-m", "trio_bg", "serve", args.app, "--supervised"]
    command.append(f"--log-level={args.log_level}")
    return command + given_flags(args)


def _accounted_for(worker: WorkerExit) -> bool:
    return worker.report is not None and worker.exit_status in (EXIT_OK, EXIT_CUT_SHORT)


def _server_failed(error: Exception) -> int:
    logger = logging.getLogger("trio_bg")
    errors = leaves(error)
    if all(isinstance(leaf, OSError) for leaf in errors):  # no traceback for "port in use"
        logger.error("the server failed: %s", "; ".join(map(str, errors)))
    else:
        logger.error("the server failed", exc_info=error)
    return EXIT_SERVER_FAILED


def _load_app(spec: str) -> ASGIApp:
    """Import ``module:attribute`` (attribute defaults to ``app``): an ASGI 3 app."""
    target = load_attribute(spec, what="app", default="app")
    if not callable(target):
        raise LookupError(f"cannot serve {spec!r}: it is {type(target).__name__}, not an ASGI app")
    if found := _not_asgi3(target):
        raise LookupError(
            f"cannot serve {spec!r}: it is {found}, not an ASGI 3 app (an async function, or "
            f"an object with an async __call__, taking scope, receive, send)"
        )
    return target


def _not_asgi3(app: Callable[..., object]) -> str | None:
    """What ``app`` is if it cannot be an ASGI 3 app; None if it is one, or may be: a
    callable whose signature cannot be inspected has the benefit of the doubt."""
    if isinstance(app, BackgroundTaskMiddleware):
        return None
    try:
        signature = inspect.signature(app)  # of __call__ for an object, of __init__ for a class
    except (TypeError, ValueError):
        return None
    parameters = signature.parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    if inspect.isclass(app):
        return "an ASGI 2 app (a class taking the scope)" if required == 1 else "a class"
    is_function = inspect.isroutine(app) or isinstance(app, functools.partial)
    call = app if is_function else type(app).__call__
    # A sync wrapper (functools.wraps) around an async def returns its awaitable: fine.
    is_async = any(map(inspect.iscoroutinefunction, (call, inspect.unwrap(call))))
    takes_three = (
        required <= 3
        and (len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in parameters))
        and not any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in parameters)
    )
    if is_async and takes_three:
        return None
    if not is_async and len(positional) == required == 2:
        return "a WSGI app (environ, start_response)"
    if not is_async and len(positional) == required == 1:
        return "an ASGI 2 app (it takes the scope alone)"
    if not is_async and takes_three:
        return "a sync function" if is_function else "an object whose __call__ is not async"
    return f"{'an async' if is_async else 'a'} callable with the signature {signature}"


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


def _status(report: ShutdownReport) -> int:
    cut_short = report.cancelled or report.abandoned or report.maybe_lost
    return EXIT_CUT_SHORT if cut_short else EXIT_OK


def _exit_status(report: ShutdownReport) -> int:
    if _status(report) == EXIT_CUT_SHORT:
        if report.cancelled or report.abandoned:
            cut = report.cancelled + report.abandoned
            what = f"{cut} background task(s) cut short by the shutdown"
        else:
            what = f"{report.maybe_lost} remote task(s) perhaps lost by Redis"
        print(f"trio_bg: {what}: {report}", file=sys.stderr)
        return EXIT_CUT_SHORT
    print(f"trio_bg: every background task finished: {report}", file=sys.stderr)
    return EXIT_OK


def _unwritable(path: Path) -> str | None:
    """Why the report could not be written to ``path``: checked before serving."""
    if path.is_dir():
        return "is a directory"
    if not path.parent.is_dir():
        return f"no directory {path.parent}"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"cannot write in {path.parent}"
    return None


def _write_report(path: Path, data: object) -> bool:
    try:
        _write_json(path, data)
    except OSError as error:
        logging.getLogger("trio_bg").error("cannot write the report: %s", error)
        return False
    return True


def _write_json(path: Path, data: object) -> None:
    """Write ``data`` to ``path`` whole or not at all: a reader never sees half a file,
    and a failure leaves no other file behind."""
    # Next to it, for os.replace; named after this process, which writes it once.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# -- argument types ------------------------------------------------------------------
