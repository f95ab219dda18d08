"""``python -m trio_bg drill``: rehearse a server's shutdown (or crash, or its remote
tasks' workers' failures) under load, and check the books."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from typing import TYPE_CHECKING, Any

from .._running.option_table import DEFAULT_GRACE_PERIOD, DRILL_FLAGS, add_flags
from .._running.values import (
    EXIT_USAGE,
    add_command,
    check_journal_path,
    non_negative_float,
    positive_float,
    positive_int,
)
from .._web.serve import SHUTDOWN_MARGIN
from .worker_command import WorkerRefused

if TYPE_CHECKING:
    from .drills.harness import DrillPlan

DRILL_EPILOG = """\
The drill starts `python -m trio_bg serve APP` on 127.0.0.1 (a free port), sends up to
--requests GET / requests at --rate from --concurrency clients, sends the server SIGTERM
after --signal-after seconds (or once every request was sent; none starts after it),
waits for the server to exit, and reads its shutdown report. Then it checks the books:
every accepted task ended completed, failed, timed out, cancelled or abandoned, and
every answered request had its tasks accepted. For the latter the app sets the response
header `x-trio-bg-tasks: N`, N being the number of tasks that request added (as
examples/drill_app.py does); without it that check is skipped, and the drill says so.

The distributed drill (--redis) hands remote tasks to streaq workers: it starts Redis
(unless --redis URL: a Redis, or a queue, of the drill's alone), --workers processes of
`python -m trio_bg worker` and the web server (`serve APP --streaq MODULE:NAME`), all
with $TRIO_BG_DRILL_REDIS set to Redis's URL and $TRIO_BG_DRILL_LEDGER to a ledger file.
Under load it kills Redis a quarter of the way in and starts it again halfway
(--kill-redis), SIGKILLs the worker running the most remote tasks halfway, or three
quarters of the way with --kill-redis (--kill-worker), SIGTERMs the web server, waits
for the workers to run what the answered requests named (a killed worker's tasks go
to another after its idle timeout), and stops them. The app names its remote tasks'
keys in `x-trio-bg-remote`, and each run notes `KEY started PID` and `KEY ran PID` in
the ledger (as examples/drill_app.py does). Every remote task an answered request named
must have run to the end at least once; runs beyond it are counted, as at-least-once
delivery allows them. With --journal the journal is the outbox: a Redis outage costs
no request a 503.

exit status:
  0  the books balance and the server stopped within --deadline
  1  tasks are unaccounted for or lost, or a process failed or did not stop in time
  2  usage error
  130  the drill was interrupted (SIGINT, SIGTERM); the processes it started are stopped
"""


def add_drill_parser(commands: Any) -> None:
    """Add the ``drill`` command to the command line's subcommands."""
    drill_parser = add_command(
        commands,
        "drill",
        "rehearse a graceful shutdown under load and check that every task is accounted for",
        "Rehearse a graceful shutdown of an ASGI app under load.",
        DRILL_EPILOG,
    )
    drill_parser.add_argument("app", help="the app to drill, as module:attribute")
    drill_parser.add_argument(
        "--requests",
        type=positive_int,
        default=400,
        metavar="N",
        help="requests to send at most (default 400)",
    )
    drill_parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=10,
        metavar="C",
        help="concurrent clients (default 10)",
    )
    drill_parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=100.0,
        metavar="R",
        help="requests per second, all clients together; 0: as fast as they go (default 100)",
    )
    drill_parser.add_argument(
        "--signal-after",
        type=non_negative_float,
        default=2.0,
        metavar="S",
        help="seconds of load before SIGTERM, or less if every request was sent (default 2)",
    )
    add_flags(drill_parser, DRILL_FLAGS)
    drill_parser.add_argument(
        "--deadline",
        type=positive_float,
        metavar="S",
        help="seconds the server may take to stop after SIGTERM before it is killed and the "
        f"drill fails (default: graceful timeout + grace period + {SHUTDOWN_MARGIN:g}; pass it "
        "for an app wrapped in code with a grace period over "
        f"{DEFAULT_GRACE_PERIOD:g})",
    )
    drill_parser.add_argument(
        "--kill",
        action="store_true",
        help="the crash drill (needs --journal): SIGKILL the server instead of SIGTERM, serve "
        "it again on the same journal, and check that every durable task an answered "
        "request named ran at least once (journal lease 5 s unless --journal-lease)",
    )
    drill_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    remote = drill_parser.add_argument_group(
        "the distributed drill (remote tasks, run by streaq workers)"
    )
    remote.add_argument(
        "--redis",
        nargs="?",
        const="",
        metavar="URL",
        help="the distributed drill, on the Redis at URL (a Redis of the drill's own, on a "
        "free port of 127.0.0.1, when no URL is given): see below",
    )
    remote.add_argument(
        "--streaq",
        metavar="MODULE:NAME",
        help="the streaq worker the workers run and the web server hands its remote tasks to "
        "(default: the app's module, attribute worker); the app's own spec, for an app "
        "wrapped in code with streaq=",
    )
    remote.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="streaq worker processes, python -m trio_bg worker (default 2); not serve's "
        "--workers: the web server runs in one process",
    )
    remote.add_argument(
        "--kill-worker",
        action="store_true",
        help="SIGKILL the worker running the most remote tasks mid-load; another runs its "
        "tasks once its idle timeout has passed",
    )
    remote.add_argument(
        "--kill-redis",
        action="store_true",
        help="SIGKILL the drill's own Redis mid-load (no --redis URL), and start it again on "
        "the same port",
    )
    remote.add_argument(
        "--redis-without-persistence",
        action="store_true",
        help="the drill's own Redis keeps its data in memory only: with --kill-redis it "
        "comes back empty; with a --journal, every task must still complete",
    )
    remote.add_argument(
        "--poison",
        action="store_true",
        help="plant a poisoned record (valid JSON, not a task's) in the queue mid-load: a "
        "worker must set it aside (recorded as failed) and go on; with --kill, a journal "
        "row that cannot be read and a durable task that SIGKILLs its process (the app "
        "adds it on GET /trio-bg-drill/poison): both must end dead letters",
    )
    remote.add_argument(
        "--idle-timeout",
        type=positive_float,
        metavar="S",
        help="set $TRIO_BG_DRILL_IDLE_TIMEOUT for the app's module, which builds its worker "
        "with it (examples/drill_app.py does; default: trio_bg.streaq's 10 s)",
    )


def drill_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``drill``; return the exit status (``parser``'s errors exit with 2)."""
    try:
        from .drills.crash import DRILL_LEASE, crash_drill
        from .drills.harness import DrillPlan
        from .drills.shutdown import drill  # needs httpx, which serving does not
    except ModuleNotFoundError as error:
        if error.name != "httpx":
            raise
        parser.error("the drill needs httpx: pip install 'trio-bg[drill]'")
    if args.kill and args.journal is None:
        parser.error("--kill needs --journal: only durable tasks can survive a SIGKILL")
    if args.poison and not args.kill and args.redis is None:
        parser.error("--poison needs --kill (the crash drill) or --redis (the distributed drill)")
    _check_remote_options(parser, args)
    check_journal_path(parser, args)
    lease = args.journal_lease
    if args.kill and lease is None:
        lease = DRILL_LEASE
    passed_on = {option.name: getattr(args, option.name) for option in DRILL_FLAGS}
    plan = DrillPlan(
        app=args.app,
        requests=args.requests,
        concurrency=args.concurrency,
        rate=args.rate,
        signal_after=args.signal_after,
        deadline=args.deadline,
        kill=args.kill,
        poison=args.poison,
        **passed_on | {"journal_lease": lease},
    )
    if args.redis is not None:
        return _remote_drill_command(parser, args, plan)
    run = crash_drill if args.kill else drill
    return run(plan, json_output=args.json)


_REMOTE_ONLY = (
    "streaq",
    "workers",
    "kill_worker",
    "kill_redis",
    "redis_without_persistence",
    "idle_timeout",
)


def _check_remote_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) the distributed drill's options where they cannot apply."""
    if args.redis is None:
        for name in _REMOTE_ONLY:
            if getattr(args, name) not in (None, False):
                parser.error(
                    f"--{name.replace('_', '-')} needs --redis, the distributed drill "
                    f"(--redis without a URL: the drill starts a Redis of its own)"
                )
        return
    if args.kill:
        parser.error("--kill (the crash drill) and --redis (the distributed drill) do not combine")
    if args.redis and "://" not in args.redis:
        parser.error(f"--redis: expected a URL (redis://HOST:PORT), not {args.redis!r}")
    for option in ("kill_redis", "redis_without_persistence"):
        if getattr(args, option) and args.redis:
            parser.error(
                f"--{option.replace('_', '-')} needs the drill's own Redis: give --redis "
                f"without a URL (a Redis of yours is not the drill's to kill or configure)"
            )
    if args.kill_worker and (args.workers or 2) < 2:
        parser.error("--kill-worker needs --workers 2 or more: another must take over its tasks")
    if not args.redis and shutil.which("redis-server") is None:
        parser.error(
            "--redis without a URL starts a redis-server, and there is none on the PATH: "
            "install it, or give --redis URL"
        )


def _remote_drill_command(
    parser: argparse.ArgumentParser, args: argparse.Namespace, plan: DrillPlan
) -> int:
    try:
        from .drills.remote import remote_drill
        from .drills.remote_plan import RemotePlan, prepare
    except ModuleNotFoundError as error:
        if error.name != "streaq":
            raise
        parser.error("the distributed drill needs streaq: pip install 'trio-bg[streaq]'")
    streaq = args.streaq
    if streaq is None:
        streaq = f"{args.app.partition(':')[0]}:worker"
    remote = RemotePlan(
        drill=plan,
        streaq=streaq,
        redis=args.redis or None,
        workers=args.workers or 2,
        kill_worker=args.kill_worker,
        kill_redis=args.kill_redis,
        redis_persists=not args.redis_without_persistence,
        idle_timeout=args.idle_timeout,
        poison=args.poison,
    )
    try:
        target = prepare(remote)
    except (LookupError, WorkerRefused) as error:
        parser.error(f"--streaq: {error}")
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "streaq":
            parser.error("the distributed drill needs streaq: pip install 'trio-bg[streaq]'")
        logging.basicConfig(stream=sys.stderr)
        logging.getLogger("trio_bg").exception("cannot load %s", streaq)
        return EXIT_USAGE
    return remote_drill(target, json_output=args.json)
