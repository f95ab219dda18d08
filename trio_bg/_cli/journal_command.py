"""``python -m trio_bg journal ls|retry|purge``: look into a journal, re-queue and purge
its dead letters."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import datetime
from functools import partial
from typing import Any

from .._engine.status import looks_like_id
from .._errors import JournalError
from .._keeping import journal_file, journal_schema

PROG = "python -m trio_bg journal"

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2

BUSY_TIMEOUT = 5.0
"""Seconds to wait for another process's write lock on the journal."""

ERROR_WIDTH = 60
"""Characters of a dead letter's error that ``ls`` shows (``--json`` shows it whole)."""

JOURNAL_EPILOG = f"""\
The journal is the SQLite file of durable tasks an app was given as journal="PATH".
These commands never create one, and never touch a queued task.

exit status:
  {EXIT_OK}  done
  {EXIT_PARTIAL}  some of the given ids were not dead letters (or not in the journal);
     the others were re-queued or purged
  {EXIT_USAGE}  usage error, no journal at the path, or the journal cannot be used (not a
     journal, a newer one, corrupt, locked)
"""

_Change = Callable[[sqlite3.Connection, Sequence[int | str] | None], int]


def add_journal_parser(commands: Any) -> None:
    """Add the ``journal`` command to the command line's subcommands."""
    parser = commands.add_parser(
        "journal",
        help="list, re-queue and purge a journal's tasks",
        description="List a journal's durable tasks; re-queue or purge its dead letters.",
        epilog=JOURNAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="journal_action", required=True, metavar="ACTION")

    ls_parser = actions.add_parser(
        "ls",
        help="list the journal's tasks",
        description="List the journal's tasks, oldest first, then count them.",
    )
    _add_journal_option(ls_parser)
    ls_parser.add_argument(
        "--state", choices=("queued", "dead"), help="list only the tasks in this state"
    )
    ls_parser.add_argument(
        "--show-arguments",
        action="store_true",
        help="show each task's arguments too: they may hold personal data, so they are "
        "never shown without this flag",
    )
    ls_parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of the tasks instead (created: unix time; error: whole)",
    )
    ls_parser.set_defaults(journal_run=_ls)

    for name, verb, change in (
        ("retry", "re-queue", journal_file.requeue),
        ("purge", "delete", journal_file.purge),
    ):
        change_parser = actions.add_parser(
            name,
            help=f"{verb} dead letters",
            description=f"{verb.capitalize()} dead letters: those given, or --all. "
            "Queued tasks are never touched.",
        )
        _add_journal_option(change_parser)
        change_parser.add_argument(
            "ids",
            nargs="*",
            type=_row_or_task_id,
            metavar="ID",
            help=f"the dead letters to {verb}: row ids (ID) or task ids (TASK ID)",
        )
        change_parser.add_argument("--all", action="store_true", help=f"{verb} every dead letter")
        change_parser.set_defaults(
            journal_run=partial(_change, change=change, verb=verb),
            journal_parser=change_parser,
        )


def _row_or_task_id(text: str) -> int | str:
    """A row id (a number) or a task id (32 hex digits, as `TaskHandle.id` has it)."""
    if text.isdigit():
        return int(text)
    if looks_like_id(text.lower()):
        return text.lower()
    raise argparse.ArgumentTypeError(f"not a row id or a task id: {text!r}")


def _add_journal_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--journal", required=True, metavar="PATH", help="the journal file")


def journal_command(args: argparse.Namespace) -> int:
    """Run ``journal``; return the exit status."""
    parser: argparse.ArgumentParser | None = getattr(args, "journal_parser", None)
    if parser is not None and bool(args.ids) == args.all:
        parser.error("give the ids of the dead letters, or --all (not both)")
    path: str = args.journal
    try:
        with closing(_open(path)) as connection:
            try:
                status: int = args.journal_run(connection, args)
            except sqlite3.Error as error:
                raise journal_schema.journal_error(error, f"the journal {path}") from error
    except JournalError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return status


def _open(path: str) -> sqlite3.Connection:
    """Connect to the journal at ``path``, which must exist: `JournalError` if not."""
    if not os.path.lexists(path):
        raise JournalError(f"no journal at {path}")
    if path == journal_schema.MEMORY:  # a file of that name, not a database in memory
        path = os.path.join(os.curdir, path)
    return journal_schema.connect(path, busy_timeout=BUSY_TIMEOUT, create=False)


# -- ls ------------------------------------------------------------------------------


def _ls(connection: sqlite3.Connection, args: argparse.Namespace) -> int:
    rows = journal_file.rows(connection)
    listed = [row for row in rows if args.state in (None, row.state)]
    if args.json:
        print(json.dumps([_as_json(row, args.show_arguments) for row in listed], indent=2))
        return EXIT_OK
    if listed:
        print(_table(listed, args.show_arguments))
    print(_summary(rows, journal_file.counts(connection)["ended"]))
    return EXIT_OK


def _table(rows: Sequence[journal_file.Row], show_arguments: bool) -> str:
    header = ["ID", "STATE", "NAME", "ATTEMPT", "OWNER", "CREATED", "ERROR", "TASK_ID"]
    lines = [header + ["ARGUMENTS"] * show_arguments]
    for row in rows:
        cells = [
            str(row.id),
            row.state,
            _one_line(row.name),
            str(row.attempt),
            "-" if row.owner is None else str(row.owner),
            datetime.fromtimestamp(row.created).isoformat(timespec="seconds"),
            _error_line(row.error),
            row.task_id or "-",
        ]
        lines.append(cells + [row.arguments] * show_arguments)
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _error_line(error: str | None) -> str:
    """The last line of ``error``, cut to `ERROR_WIDTH`; ``-`` if there is none."""
    lines = [line for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return "-"
    line = _one_line(lines[-1])
    return line if len(line) <= ERROR_WIDTH else line[: ERROR_WIDTH - 3] + "..."


def _one_line(text: str) -> str:
    """``text`` with each run of whitespace (newlines, tabs) made one space."""
    return " ".join(text.split())


def _summary(rows: Sequence[journal_file.Row], ended: int) -> str:
    queued = [row for row in rows if row.state == "queued"]
    claimed = sum(row.owner is not None for row in queued)
    dead = len(rows) - len(queued)
    summary = f"{len(queued)} queued ({claimed} claimed by a process), {dead} dead"
    # Statuses only (no arguments): what task_status reads once the tasks ended.
    return f"{summary}, {ended} ended" if ended else summary


def _as_json(row: journal_file.Row, show_arguments: bool) -> dict[str, object]:
    data: dict[str, object] = {
        "id": row.id,
        "task_id": row.task_id,
        "state": row.state,
        "name": row.name,
        "attempt": row.attempt,
        "owner": row.owner,
        "created": row.created,
        "error": row.error,
    }
    if show_arguments:
        data["arguments"] = _decoded(row.arguments)
    return data


def _decoded(arguments: str) -> object:
    """The ``[args, kwargs]`` a row's arguments hold; the text itself if not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# -- retry, purge --------------------------------------------------------------------


def _change(
    connection: sqlite3.Connection, args: argparse.Namespace, change: _Change, verb: str
) -> int:
    """Re-queue or purge (``change``) the dead letters given; report the others."""
    if args.all:
        print(f"{_past(verb)} {_dead_letters(change(connection, None))}")
        return EXIT_OK
    ids: list[int | str] = list(dict.fromkeys(args.ids))
    found: dict[int | str, str] = {}
    for row in journal_file.rows(connection, ids=ids):
        found[row.id] = row.state
        if row.task_id is not None:
            found[row.task_id] = row.state
    dead = [id for id in ids if found.get(id) == "dead"]
    # Only with ids: no ids would mean every dead letter.
    changed = change(connection, dead) if dead else 0
    print(f"{_past(verb)} {_dead_letters(changed)}")
    for id in ids:
        if id not in found:
            print(f"{PROG}: task {id} is not in the journal", file=sys.stderr)
        elif found[id] != "dead":
            print(f"{PROG}: task {id} is {found[id]}, not a dead letter", file=sys.stderr)
    if changed < len(dead):
        print(
            f"{PROG}: {len(dead) - changed} of the dead letters given were re-queued or "
            f"purged meanwhile by another command",
            file=sys.stderr,
        )
    return EXIT_OK if changed == len(ids) else EXIT_PARTIAL


def _past(verb: str) -> str:
    return f"{verb}d"


def _dead_letters(count: int) -> str:
    return f"{count} dead letter{'' if count == 1 else 's'}"
