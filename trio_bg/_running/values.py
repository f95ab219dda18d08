"""What the commands share: the exit statuses, what they read (``module:attribute``
specs, numbers with bounds), and how they describe an error."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path
from typing import Any

from .._keeping.journal_schema import journal_path_problem

EXIT_OK = 0
EXIT_USAGE = 2


def load_attribute(spec: str, *, what: str, default: str | None = None) -> object:
    """Import ``module:attribute`` (``default`` when the attribute is left out), with
    the current directory on ``sys.path`` as Hypercorn does; `LookupError` saying what
    is wrong (``what``: "app", "worker"), or the import's own error for a module the
    target's code imports."""
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or default or ""
    if not module_name or not attribute:
        raise LookupError(f"cannot load {spec!r}: give the {what} as module:attribute")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name and not module_name.startswith(f"{error.name}."):
            raise  # a module the target's own code imports is missing: show the traceback
        raise LookupError(f"cannot load {spec!r}: no module named {error.name!r}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LookupError(f"cannot load {spec!r}: {module_name} has no {attribute!r}") from None
    return target


def add_command(
    commands: Any, name: str, summary: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """Add the command ``name`` to the command line's subcommands (``summary``: its line
    in the list); its ``epilog`` is shown as written."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in ``error``, nested groups flattened (Hypercorn's and streaq's
    task groups nest them)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def describe_error(error: BaseException, *, once: bool = False) -> str:
    """``Type: message`` of each exception in ``error`` (``once``: of each different
    one), joined by "; "."""
    described = [f"{type(leaf).__name__}: {leaf}" for leaf in leaves(error)]
    return "; ".join(dict.fromkeys(described) if once else described)


def check_journal_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) a ``--journal`` path that could never be a journal, before
    anything starts."""
    if args.journal is not None and (problem := journal_path_problem(Path(args.journal))):
        parser.error(f"--journal {args.journal}: {problem}")


def bind_address(text: str) -> str:
    """A ``--bind`` (HOST:PORT, HOST, unix:PATH or fd://N) whose port or file descriptor
    is a possible one: Hypercorn would fail on it with a traceback."""
    if text.startswith("unix:"):
        return text
    if text.startswith("fd://"):
        if not text.removeprefix("fd://").isdecimal():
            raise argparse.ArgumentTypeError(f"expected fd://N, N a file descriptor, not {text}")
        return text
    try:  # read as Hypercorn reads it: no port, or no number after the colon, is port 8000
        port = int(text.replace("[", "").replace("]", "").rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return text
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be 0 to 65535, not {port}")
    return text
