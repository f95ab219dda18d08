"""What the dashboard shows of a nursery, at one look, as JSON-ready values: the counts,
the chart, the system's state, and its tables as rows of cells. The first page is
rendered from it on the server (`dashboard_page`), and every open page fetches it again
each second to stay live: so it is small (at most `LIST_LIMIT` rows per table) and its
tables are already cut into cells, which the page's script puts in place as they are."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, get_args

from .._engine.recorder import TIMELINE_POINTS, TIMELINE_STEP, NameRecord, TaskRecorder
from .._engine.status import TaskState, TaskStatus
from .._errors import JournalError
from .._running.nursery import (
    BackgroundNursery,
    journal_of,
    newest_ended,
    record_tasks,
    remote_keeper,
    settings_of,
)

LIST_LIMIT = 50
"""Rows per table, at most (the newest ended tasks, the oldest dead letters)."""

ARGUMENTS_SHOWN = 300
"""Characters of a dead letter's arguments shown (with ``show_arguments=True``)."""

ENDED_STATES: tuple[TaskState, ...] = (
    "completed",
    "failed",
    "timed_out",
    "cancelled",
    "abandoned",
    "handed_off",
)
"""The outcomes the recently ended tasks can be filtered by."""

LIVE_SHOWN: tuple[TaskState, ...] = ("running", "retrying", "pending")
"""The live tasks listed, in this order."""

COUNTED = ("running", "pending", "retrying", *ENDED_STATES, "rejected", "discarded")
"""The counters shown, from `TaskStats`."""

SERIES = {  # the chart's bars: its series, and the outcomes each stacks
    "completed": ("completed", "handed_off"),
    "failed": ("failed", "timed_out"),
    "cancelled": ("cancelled", "abandoned"),
}

Cell = str | int | dict[str, Any] | None
"""A table cell: text (None: nothing to show), or one of the shapes `dashboard_page`
renders: ``{"since": t}`` (an age), ``{"badge": state}``, ``{"code": text}``,
``{"id": task_id}`` (shown short), ``{"progress": fraction}``, ``{"text": long}`` (a
message or an error: it may wrap), and
``{"do": [[action, id, label], ...]}`` (buttons)."""

assert set(ENDED_STATES) <= set(get_args(TaskState))


@dataclass(frozen=True, slots=True)
class View:
    """How a dashboard shows things: with its action buttons or not, with the dead
    letters' arguments or not, and the recently ended tasks filtered by ``name`` and
    ``outcome`` (None: any)."""

    read_only: bool = False
    show_arguments: bool = False
    name: str | None = None
    outcome: TaskState | None = None


async def look(nursery: BackgroundNursery, view: View) -> dict[str, Any]:
    """What the dashboard shows of ``nursery`` now (see the module). The first look
    starts the recording of per-name times (`record_tasks`)."""
    recorder = record_tasks(nursery)
    stats = nursery.stats
    settings = settings_of(nursery)
    now = time.time()
    live: list[TaskStatus] = []
    seen: set[str] = set()
    for state in LIVE_SHOWN:  # (a task may move on between two of these: listed once)
        for status in await nursery.list_tasks(state=state, limit=LIST_LIMIT - len(live)):
            if status.id not in seen:
                seen.add(status.id)
                live.append(status)
    ended = newest_ended(nursery, LIST_LIMIT, view.outcome, view.name)
    journal, dead = await _journal(nursery, view)
    remote = remote_keeper(nursery)
    counts = {name: getattr(stats, name) for name in COUNTED}
    system = {
        "state": "draining: new tasks are refused" if nursery.closed else "serving",
        "grace_period": seconds(settings.grace_period),
        "running": f"{stats.running} of {settings.max_running}",
        "pending": f"{stats.pending} of {settings.max_pending}",
        "oldest_pending": seconds(stats.oldest_pending_age) if stats.pending else "none waits",
        "threads": f"{stats.threads_in_use} of {settings.thread_limit}",
        **journal,
        "redis": (
            "not configured"
            if remote is None
            else "reachable"
            if await remote.handoff.reachable()
            else "unreachable: remote tasks wait in the outbox"
            if journal_of(nursery) is not None
            else "unreachable: requests that add remote tasks get 503"
        ),
    }
    live_note = _more(len(live), stats.running + stats.pending)
    return {
        "now": now,
        "draining": nursery.closed,
        "counts": counts,
        "rates": _per_minute(recorder, now),
        "chart": chart(recorder, now),
        "system": system,
        "tables": {
            "live": {"rows": [_live_row(status, view) for status in live], "note": live_note},
            "ended": {"rows": [_ended_row(status) for status in ended], "note": ""},
            "names": {"rows": _name_rows(recorder), "note": ""},
            "dead": dead,
        },
        "names": sorted(recorder.by_name),
    }


def seconds(value: float | None) -> str:
    """A duration for people: ``12 ms``, ``3.4 s``, ``2 min 5 s``, ``1 h 4 min``.
    (The page's script has the same, for the ages it keeps up to date.)"""
    if value is None:
        return ""
    if value == 0:
        return "0 s"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 10:
        return f"{value:.1f} s"
    if value < 60:
        return f"{value:.0f} s"
    if value < 3600:
        return f"{value // 60:.0f} min {value % 60:.0f} s"
    return f"{value // 3600:.0f} h {value % 3600 // 60:.0f} min"


def chart(recorder: TaskRecorder, now: float) -> dict[str, Any]:
    """The last minutes' outcomes, one bar per `TIMELINE_STEP`: ``bars`` holds
    ``[slot, completed, failed, cancelled]`` for the slots with any (slot 0 the
    oldest, ``slots - 1`` the current one), ``max`` the tallest bar."""
    last = now // TIMELINE_STEP * TIMELINE_STEP
    bars = []
    for at, counts in recorder.timeline:
        slot = TIMELINE_POINTS - 1 - round((last - at) / TIMELINE_STEP)
        if slot >= 0:
            bars.append([slot, *(sum(counts.get(o, 0) for o in SERIES[s]) for s in SERIES)])
    return {
        "step": TIMELINE_STEP,
        "slots": TIMELINE_POINTS,
        "max": max((sum(bar[1:]) for bar in bars), default=0),
        "bars": bars,
    }


def _per_minute(recorder: TaskRecorder, now: float) -> dict[str, int]:
    """Each series' tasks ended in the last minute."""
    rates = dict.fromkeys(SERIES, 0)
    for at, counts in recorder.timeline:
        if at > now - 60:
            for series, outcomes in SERIES.items():
                rates[series] += sum(counts.get(outcome, 0) for outcome in outcomes)
    return rates


def _more(shown: int, total: int) -> str:
    return f"The first {shown} of {total}." if total > shown else ""


def _long(text: str | None) -> Cell:
    return None if text is None else {"text": text}


def _row(key: str, cells: list[Cell]) -> dict[str, Any]:
    return {"key": key, "cells": cells}


def _live_row(status: TaskStatus, view: View) -> dict[str, Any]:
    created = status.created_at.timestamp() if status.created_at else None
    cells: list[Cell] = [
        status.name,
        {"id": status.id},
        {"badge": status.state},
        {"since": created},
        status.attempt,
        None if status.progress is None else {"progress": status.progress},
        _long(status.message),
    ]
    if not view.read_only:
        cells.append({"do": [["cancel", status.id, f"Cancel {status.name} {status.id[:8]}"]]})
    return _row(status.id, cells)


def _ended_row(status: TaskStatus) -> dict[str, Any]:
    duration = None
    if status.started_at is not None and status.ended_at is not None:
        duration = (status.ended_at - status.started_at).total_seconds()
    ended = status.ended_at.timestamp() if status.ended_at else None
    return _row(
        status.id,
        [
            status.name,
            {"id": status.id},
            {"badge": status.state},
            {"since": ended},
            seconds(duration),
            status.attempt,
            _long(status.error),
        ],
    )


def _name_rows(recorder: TaskRecorder) -> list[dict[str, Any]]:
    return [_name_row(name, record) for name, record in sorted(recorder.by_name.items())]


def _name_row(name: str, record: NameRecord) -> dict[str, Any]:
    outcomes = record.outcomes
    ran = record.durations.percentiles(0.5, 0.95, 0.99)
    waited = record.waits.percentiles(0.5, 0.95, 0.99)
    failed = outcomes.get("failed", 0) + outcomes.get("timed_out", 0)
    return _row(
        name,
        [name, sum(outcomes.values()), failed, *map(seconds, ran), *map(seconds, waited)],
    )


async def _journal(nursery: BackgroundNursery, view: View) -> tuple[dict[str, str], dict[str, Any]]:
    """The journal's counts, for the system's panel, and its dead letters' table."""
    journal = journal_of(nursery)
    if journal is None:
        absent = dict.fromkeys(("backlog", "outbox", "dead"), "no journal")
        return absent, {"rows": [], "note": "No journal: durable tasks are not configured."}
    try:
        counts = await journal.counts()
        rows = await journal.dead_letters(LIST_LIMIT)
    except JournalError as error:  # a passing disk or lock trouble: say so, stay up
        unreadable = dict.fromkeys(("backlog", "outbox", "dead"), "unreadable")
        return unreadable, {"rows": [], "note": str(error)}
    summary = {
        "backlog": f"{counts['queued']} queued",
        "outbox": f"{counts['outbox']} waiting for Redis",
        "dead": str(counts["dead"]),
    }
    table = []
    for row in rows:
        cells: list[Cell] = [
            row.name,
            row.id,
            None if row.task_id is None else {"id": row.task_id},
            row.attempt,
            _long(row.error),
            {"since": row.created or None},
        ]
        if view.show_arguments:
            arguments = row.arguments
            if len(arguments) > ARGUMENTS_SHOWN:
                arguments = arguments[:ARGUMENTS_SHOWN] + "…"
            cells.append({"code": arguments})
        if not view.read_only:
            label = f"{row.name} (row {row.id})"
            cells.append(
                {
                    "do": [
                        ["retry", str(row.id), f"Retry {label}"],
                        ["purge", str(row.id), f"Purge {label}"],
                    ]
                }
            )
        table.append(_row(f"d{row.id}", cells))
    return summary, {"rows": table, "note": _more(len(rows), counts["dead"])}
