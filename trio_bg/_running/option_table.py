"""The options a background nursery takes, and the command line passes on, in one table:
the nursery's checks and defaults, the flags, the worker command, the drill plan and the
docs' table are made from it."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from .._engine.calls import is_async_callable, name_of
from .._engine.events import TaskEvent
from .._keeping.journal import DEFAULT_JOURNAL_STATUSES_KEPT_FOR, DEFAULT_LEASE
from .._keeping.journal_schema import SYNCHRONOUS_LEVELS
from .statuses import DEFAULT_STATUSES_KEPT, DEFAULT_STATUSES_KEPT_FOR
from .values import non_negative_float, non_negative_int, positive_float, positive_int

DEFAULT_GRACE_PERIOD = 10.0
"""Seconds a shutdown waits for running tasks before it cancels them.

Long enough for typical follow-up work (an e-mail, a webhook), short enough to fit
inside a container platform's usual 30 s termination window, after Hypercorn's own
``graceful_timeout`` (3 s) for in-flight requests.
"""

DEFAULT_SYNCHRONOUS = "normal"
"""The journal's SQLite ``synchronous`` level. In WAL mode ``normal`` keeps every commit
through any crash of the process (``kill -9``, an OOM kill, a crashed server) and a
clean reboot; only a power cut or an OS crash may lose the last commits. ``full`` syncs
each commit to the disk, for that too, at a price: on this project's benchmark machine
a sync per group commit costs about a fifth of the requests per second (README,
Benchmarks). SQLite recommends ``normal`` with WAL for most applications."""

DEFAULT_THREAD_LIMIT = 40
"""Worker threads for plain-function tasks: trio's default number, in a pool of our own."""

DEFAULT_MAX_RUNNING = 1_000
"""Tasks running at once (async and thread tasks together); the rest wait as pending."""

DEFAULT_MAX_PENDING = 10_000
"""Tasks waiting for a running slot; past it `add_task` raises `Overloaded`."""

HYPERCORN_GRACEFUL_TIMEOUT = 3.0
"""Hypercorn's own ``graceful_timeout``, when the command line does not set one."""

ErrorHook = Callable[[str, BaseException], object]
"""``on_error(task_name, exception)``, called when a background task raises."""

EventHook = Callable[[TaskEvent], object]
"""``on_event(event)``, called at each step of every task's life."""

Check = Callable[[str, Any], Any]
"""``check(name, value)``: the value to keep (`TypeError` or `ValueError` if refused)."""


@dataclass(frozen=True, slots=True)
class Flag:
    """How the command line takes an option: ``--name-with-dashes=VALUE``."""

    metavar: str
    parse: Callable[[str], Any] = str
    default_note: str | None = "default {default:g}"
    """How ``--help`` says the default, after the option's help (None: it does not)."""
    _: KW_ONLY
    drill: bool = True
    """Also an option of ``drill``, which passes it on to the server it drills."""


@dataclass(frozen=True, slots=True)
class Option:
    """One option: its name and type in `NurseryOptions`, its default, its flag."""

    name: str
    type: Any
    default: Any
    help: str
    check: Check | None = None
    flag: Flag | None = None
    """None: given in code only."""
    _: KW_ONLY
    nursery: bool = True
    """False: Hypercorn's, on the command line only (not in `NurseryOptions`)."""

    @property
    def flag_name(self) -> str:
        """``--name-with-dashes``."""
        return "--" + self.name.replace("_", "-")

    @property
    def flag_help(self) -> str:
        """The help ``--help`` shows: the help, then the default."""
        assert self.flag is not None
        note = self.flag.default_note
        return self.help if note is None else f"{self.help} ({note.format(default=self.default)})"


def _seconds(minimum: float) -> Check:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number of seconds, not {value!r}")
        if not (value >= minimum and math.isfinite(value)):
            raise ValueError(f"{name} must be finite and >= {minimum:g}, not {value!r}")
        return value

    return check


def _count(minimum: int) -> Check:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, not {value!r}")
        return value

    return check


def _tracing(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    if value:
        from .._engine import tracing  # noqa: F401 -- an ImportError naming the extra, now
    return value


def _journal(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise TypeError(f"{name} must be a file path (or ':memory:'), not {value!r}")
    return os.fspath(value)  # the path itself is checked when the journal opens, at startup


def _synchronous(name: str, value: Any) -> Any:
    if value not in SYNCHRONOUS_LEVELS:
        raise ValueError(f"{name} must be one of {', '.join(SYNCHRONOUS_LEVELS)}, not {value!r}")
    return value


def _streaq(name: str, value: Any) -> Any:
    if value is not None:
        from .._keeping.streaq_worker import check_worker  # (imports streaq: only when asked for)

        check_worker(value)
    return value


def _hook(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable, not {value!r}")
    if is_async_callable(value):
        # Called synchronously in trio's thread, a coroutine would never run.
        raise TypeError(
            f"{name} must be a plain function, not an async one: hooks are called "
            f"synchronously in trio's thread, so {name_of(value)}() would never run. "
            f"Record what you need in the hook; for async work, start a task "
            f"(BackgroundNursery.start_soon) from it"
        )
    return value


_SECONDS = "S"
_COUNT = "N"

# In the order the checks run, and the flags show.
OPTIONS: tuple[Option, ...] = (
    Option(
        "grace_period", float, DEFAULT_GRACE_PERIOD,
        "seconds the shutdown waits for background tasks", _seconds(0),
        Flag(
            _SECONDS, non_negative_float,
            "default {default:g}, or what an app wrapped in code was given",
        ),
    ),
    Option(
        "thread_limit", int, DEFAULT_THREAD_LIMIT,
        "worker threads for plain-function tasks", _count(1),
        Flag(_COUNT, positive_int, drill=False),
    ),
    Option(
        "max_running", int, DEFAULT_MAX_RUNNING,
        "background tasks running at once", _count(1), Flag(_COUNT, positive_int),
    ),
    Option(
        "max_pending", int, DEFAULT_MAX_PENDING,
        "tasks waiting for a slot before requests get 503", _count(0),
        Flag(_COUNT, non_negative_int),
    ),
    Option(
        "statuses_kept", int, DEFAULT_STATUSES_KEPT,
        "ended tasks whose statuses are kept in memory, at most", _count(0),
        Flag(_COUNT, non_negative_int, drill=False),
    ),
    Option(
        "statuses_kept_for", float, DEFAULT_STATUSES_KEPT_FOR,
        "seconds an ended task's status is kept in memory, at most", _seconds(0),
        Flag(_SECONDS, non_negative_float, drill=False),
    ),
    Option(
        "tracing", bool, False,
        "an OpenTelemetry span for each task (the tracing extra)", _tracing,
    ),
    Option(
        "journal", str | os.PathLike[str] | None, None,
        "the SQLite journal of durable tasks (created if missing): they are stored before "
        "each response completes and survive a crash or a restart",
        _journal, Flag("PATH", default_note=None),
    ),
    Option(
        "journal_lease", float, DEFAULT_LEASE,
        "seconds before another process resumes the journal rows of one that died",
        _seconds(1), Flag(_SECONDS, positive_float),
    ),
    Option(
        "journal_synchronous", str, DEFAULT_SYNCHRONOUS,
        f"the journal's SQLite synchronous level: {', '.join(SYNCHRONOUS_LEVELS)}",
        _synchronous,
    ),
    Option(
        "journal_statuses_kept_for", float, DEFAULT_JOURNAL_STATUSES_KEPT_FOR,
        "seconds the journal keeps an ended durable task's status (not its arguments) "
        "for every process; 0: none", _seconds(0),
        Flag(_SECONDS, non_negative_float, drill=False),
    ),
    Option(
        "streaq", Any, None,
        "the streaq worker (made with trio_bg.streaq.worker()) that remote tasks are handed "
        "to, loaded like the app",
        _streaq, Flag("MODULE:NAME", default_note=None, drill=False),
    ),
    Option(
        "on_error", ErrorHook | None, None,
        "on_error(task_name, exception), called when a background task raises", _hook,
    ),
    Option(
        "on_event", EventHook | None, None,
        "on_event(event), called at each step of every task's life", _hook,
    ),
    Option(
        "graceful_timeout", float, HYPERCORN_GRACEFUL_TIMEOUT,
        "seconds in-flight requests get at shutdown", None,
        Flag(_SECONDS, non_negative_float, "Hypercorn's; default {default:g}"),
        nursery=False,
    ),
)  # fmt: skip

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}

NURSERY_OPTIONS = tuple(option for option in OPTIONS if option.nursery)
"""The keys of `NurseryOptions`."""

FLAGS = tuple(option for option in OPTIONS if option.flag is not None)
"""The options ``serve`` takes on the command line (and passes on to its workers)."""

DRILL_FLAGS = tuple(option for option in FLAGS if option.flag and option.flag.drill)
"""Those ``drill`` takes too, and passes on to the server it drills."""


def add_flags(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    """Add ``options``' flags to ``parser`` (no default: None when not given)."""
    for option in options:
        assert option.flag is not None
        parser.add_argument(
            option.flag_name,
            type=option.flag.parse,
            metavar=option.flag.metavar,
            help=option.flag_help,
        )


def given_flags(values: object, options: tuple[Option, ...] = FLAGS) -> list[str]:
    """``--name=value`` for each of ``options`` that ``values`` (a namespace, a plan)
    has set (not None)."""
    return [
        f"{option.flag_name}={value}"
        for option in options
        if (value := getattr(values, option.name)) is not None
    ]


def markdown_table() -> str:
    """The options as a Markdown table, for the docs."""
    lines = ["| option | type | default | flag | meaning |", "| --- | --- | --- | --- | --- |"]
    for option in OPTIONS:
        flag = f"`{option.flag_name}`" if option.flag is not None else ""
        where = "" if option.nursery else " (Hypercorn's; command line only)"
        lines.append(
            f"| `{option.name}` | `{_type_name(option.type)}` | `{option.default!r}` "
            f"| {flag} | {option.help}{where} |"
        )
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")
