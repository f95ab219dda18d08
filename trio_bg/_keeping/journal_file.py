"""The statements run on an open journal (`journal_schema` opens it, and says what its
tables hold). Plain, blocking code: `Journal` runs it on the one thread that owns the
connection, and the ``journal`` command runs it directly.

A process registers as an owner (`join`) and claims rows; a row claimed with
``started`` set had its run cut short by the death of its process: that counts as an
attempt. A process renews its lease while it lives, and when it renews its own it also
releases the rows of any process whose lease has expired (`reap`): then another process
may claim them. The ``journal`` command lists the rows, and requeues or purges the dead
letters.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import journal_schema

REMOTE_PREFIX = "streaq:"
"""How a journal row names a remote task (kept until Redis has it): before its name."""


@dataclass(frozen=True, slots=True)
class Row:
    """One task as the journal keeps it."""

    id: int
    name: str
    arguments: str
    attempt: int
    state: str = "queued"
    owner: int | None = None
    created: float = 0.0
    error: str | None = None
    started: bool = False
    """Whether its attempt had started (and not ended) when it was read."""
    sent: str | None = None
    """A remote task's stream entry id, once Redis has it."""
    task_id: str | None = None
    """The id of its `TaskHandle` (None in a row written by hand)."""
    progress: float | None = None
    message: str | None = None
    """What its task last said of how far it got (`trio_bg.set_progress`)."""


@dataclass(frozen=True, slots=True)
class EndedRow:
    """What the journal keeps of a task that ended: its status, without its arguments."""

    task_id: str
    name: str
    state: str
    attempt: int
    progress: float | None
    message: str | None
    result: str | None
    """Its return value's JSON text, if it was JSON and small enough."""
    error: str | None
    created: float
    started: float | None
    ended: float


EndedTask = tuple[
    int,
    str,
    str,
    int,
    float | None,
    str | None,
    str | None,
    str | None,
    float | None,
    float,
    float | None,
]
"""What `end` writes of a task: (row id, state, name, attempt, progress, message,
result, error, started, ended, key_until); the row gives its task id and created."""


# -- what a process does -------------------------------------------------------------


def join(connection: sqlite3.Connection, lease: float) -> int:
    """Register this process as an owner holding a lease of ``lease`` seconds; its id."""
    with journal_schema.transaction(connection):
        owner = int(
            connection.execute(
                "INSERT INTO owners (pid, host, expires) VALUES (?, ?, ?) RETURNING id",
                (os.getpid(), socket.gethostname(), time.time() + lease),
            ).fetchone()[0]
        )
        reap(connection, owner)  # a process that died long ago: its rows are ours to take
        return owner


def held(connection: sqlite3.Connection, owner: int) -> set[int]:
    """The ids of the rows ``owner`` holds."""
    return {id for (id,) in connection.execute("SELECT id FROM tasks WHERE owner = ?", (owner,))}


def renew(connection: sqlite3.Connection, owner: int, lease: float) -> bool:
    """Extend ``owner``'s lease; False if it had expired and been reaped meanwhile (it
    is registered again, and its rows may have been claimed by another process)."""
    expires = time.time() + lease
    cursor = connection.execute("UPDATE owners SET expires = ? WHERE id = ?", (expires, owner))
    if cursor.rowcount:
        return True
    connection.execute(
        "INSERT INTO owners (id, pid, host, expires) VALUES (?, ?, ?, ?)",
        (owner, os.getpid(), socket.gethostname(), expires),
    )
    return False


def append(
    connection: sqlite3.Connection,
    owner: int,
    rows: Sequence[tuple[str, str, int] | tuple[str, str, int, str]],
) -> list[int | None]:
    """Insert tasks (name, JSON arguments, attempt, and task id) claimed by ``owner``;
    the row id of each, in order. A task id that a queued row has already is not
    stored (a duplicate: None); one that a dead letter has queues that row again, as
    this task; one whose ended task still holds its key (``key_until``) is a duplicate
    too. (A row without a task id, written by tests, is always stored.)

    One statement for all the rows: Python's sqlite3 lets go of the GIL at every
    statement step, and taking it back from a busy event loop can take a while.
    """
    if not rows:
        return []
    stored = connection.execute(
        "INSERT INTO tasks (name, arguments, attempt, owner, created, task_id) "
        "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
        "json_extract(value, '$[2]'), :owner, :now, json_extract(value, '$[3]') "
        "FROM json_each(:rows) WHERE NOT EXISTS (SELECT 1 FROM ended "
        "WHERE ended.task_id = json_extract(value, '$[3]') AND ended.key_until > :now) "
        "ORDER BY key "
        "ON CONFLICT (task_id) DO UPDATE SET name = excluded.name, "
        "arguments = excluded.arguments, attempt = excluded.attempt, state = 'queued', "
        "owner = excluded.owner, created = excluded.created, error = NULL, started = 0, "
        "sent = NULL, progress = NULL, message = NULL WHERE state = 'dead' "
        "RETURNING task_id, id",
        {"owner": owner, "now": time.time(), "rows": _json_list(rows)},
    ).fetchall()
    by_task_id = {task_id: id for task_id, id in stored if task_id is not None}
    # Rows without a task id are new rows: AUTOINCREMENT numbers them in order.
    unnamed = iter(sorted(id for task_id, id in stored if task_id is None))
    return [by_task_id.get(row[3]) if len(row) > 3 else next(unnamed) for row in rows]


def remove(connection: sqlite3.Connection, owner: int, ids: Sequence[int]) -> None:
    """Delete done (or discarded) tasks of ``owner``, in one statement. (Each of these
    writes skips the rows ``owner`` no longer holds: a late finisher never touches
    another process's claim.)"""
    connection.execute(
        "DELETE FROM tasks WHERE owner = ? AND id IN (SELECT value FROM json_each(?))",
        (owner, _json_list(ids)),
    )


def end(connection: sqlite3.Connection, owner: int, ended: Sequence[EndedTask]) -> None:
    """Tasks of ``owner`` ended (completed, or cancelled on request): their rows go, and
    their statuses are kept in ``ended`` (replacing an earlier run's of the same id)."""
    connection.execute(
        "INSERT OR REPLACE INTO ended (task_id, name, state, attempt, progress, message, "
        "result, error, created, started, ended, key_until) "
        "SELECT tasks.task_id, json_extract(value, '$[2]'), json_extract(value, '$[1]'), "
        "json_extract(value, '$[3]'), json_extract(value, '$[4]'), "
        "json_extract(value, '$[5]'), json_extract(value, '$[6]'), "
        "json_extract(value, '$[7]'), tasks.created, json_extract(value, '$[8]'), "
        "json_extract(value, '$[9]'), json_extract(value, '$[10]') "
        "FROM json_each(:ended) JOIN tasks ON tasks.id = json_extract(value, '$[0]') "
        "WHERE tasks.owner = :owner AND tasks.task_id IS NOT NULL",
        {"owner": owner, "ended": _json_list(ended)},
    )
    remove(connection, owner, [row[0] for row in ended])


def sweep(connection: sqlite3.Connection, kept_for: float) -> int:
    """Forget the statuses of tasks that ended over ``kept_for`` seconds ago (but those
    whose key is still held); how many."""
    now = time.time()
    return connection.execute(
        "DELETE FROM ended WHERE ended < ? AND (key_until IS NULL OR key_until <= ?)",
        (now - kept_for, now),
    ).rowcount


def mark_sent(
    connection: sqlite3.Connection, owner: int, receipts: Sequence[tuple[int, str]]
) -> None:
    """Record where Redis put remote tasks of ``owner`` it acknowledged: (id, receipt)
    pairs."""
    connection.execute(
        "UPDATE tasks SET sent = json_extract(value, '$[1]') FROM json_each(?) "
        "WHERE tasks.id = json_extract(value, '$[0]') AND owner = ?",
        (_json_list(receipts), owner),
    )


def unsend(connection: sqlite3.Connection, owner: int, ids: Sequence[int]) -> None:
    """Queue remote tasks of ``owner`` again, for any process, that Redis lost."""
    connection.execute(
        "UPDATE tasks SET sent = NULL, owner = NULL "
        "WHERE owner = ? AND id IN (SELECT value FROM json_each(?))",
        (owner, _json_list(ids)),
    )


def set_attempt(connection: sqlite3.Connection, owner: int, id: int, attempt: int) -> None:
    """Record that task ``id`` is on attempt ``attempt``, not started yet (its retry is
    due, or its last run died with its process)."""
    connection.execute(
        "UPDATE tasks SET attempt = ?, started = 0 WHERE id = ? AND owner = ?", (attempt, id, owner)
    )


def set_progress(
    connection: sqlite3.Connection,
    owner: int,
    progress: Sequence[tuple[int, float | None, str | None]],
) -> None:
    """Record what tasks (row id, fraction, message) said of how far they got."""
    connection.executemany(
        "UPDATE tasks SET progress = ?, message = ? WHERE id = ? AND owner = ?",
        [(fraction, message, id, owner) for id, fraction, message in progress],
    )


def start(connection: sqlite3.Connection, owner: int, ids: Sequence[int]) -> None:
    """Record that the current attempts of tasks ``ids`` of ``owner`` start, in one
    statement: found so when claimed, a row's run was cut short by the death of its
    process."""
    connection.execute(
        "UPDATE tasks SET started = 1 WHERE owner = ? AND id IN (SELECT value FROM json_each(?))",
        (owner, _json_list(ids)),
    )


def bury(connection: sqlite3.Connection, owner: int, id: int, error: str) -> None:
    """Make task ``id`` a dead letter: it failed its last attempt."""
    connection.execute(
        "UPDATE tasks SET state = 'dead', owner = NULL, error = ? WHERE id = ? AND owner = ?",
        (error, id, owner),
    )


def claim(
    connection: sqlite3.Connection, owner: int, names: Sequence[str], limit: int
) -> list[Row]:
    """Claim for ``owner`` up to ``limit`` queued tasks, oldest first, that are nobody's
    and whose name is one of ``names``. (The rows of a process that died become
    nobody's when a live one `reap`s.) The index gives them in order: no sort of the
    whole backlog per claim.

    The arguments are read as bytes and decoded here, so that no row can fail the
    claim of the others: one that is not text (a damaged page, a row written by hand)
    is made a dead letter, in this transaction, and returned as such.
    """
    claimed = connection.execute(
        """
        UPDATE tasks SET owner = :owner
        WHERE id IN (
            SELECT id FROM tasks
            WHERE state = 'queued' AND owner IS NULL
            AND name IN (SELECT value FROM json_each(:names))
            ORDER BY id LIMIT :limit
        )
        RETURNING id, name, CAST(arguments AS BLOB), attempt, started, sent, task_id
        """,
        {"owner": owner, "names": _json_list(names), "limit": limit},
    ).fetchall()
    rows = []
    for id, name, data, attempt, started, sent, task_id in sorted(claimed):
        error = None
        try:
            # As a str with lone surrogates, which JSON allows, was stored by trio_bg
            # before it escaped them.
            arguments = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            arguments, error = "", "cannot run from the journal: its arguments are not UTF-8"
        if type(attempt) is not int or attempt < 1:
            error = "cannot run from the journal: its attempt is not a number"
        if error is not None:
            bury(connection, owner, id, error)
            rows.append(Row(id, name, arguments, 1, "dead", error=error, task_id=task_id))
        else:
            rows.append(
                Row(id, name, arguments, attempt, started=bool(started), sent=sent, task_id=task_id)
            )
    return rows


def reap(connection: sqlite3.Connection, owner: int) -> int:
    """Release the rows of the processes whose lease has expired (or that are gone),
    and forget those processes; return how many rows were released."""
    now = time.time()
    released = connection.execute(
        "UPDATE tasks SET owner = NULL WHERE state = 'queued' AND owner IS NOT NULL "
        "AND owner != :owner AND owner NOT IN (SELECT id FROM owners WHERE expires > :now)",
        {"owner": owner, "now": now},
    ).rowcount
    connection.execute("DELETE FROM owners WHERE expires <= ? AND id != ?", (now, owner))
    return released


def unknown(connection: sqlite3.Connection, names: Sequence[str]) -> dict[str, int]:
    """Queued tasks whose name is not one of ``names``, counted by name."""
    rows = connection.execute(
        "SELECT CAST(name AS BLOB), count(*) FROM tasks WHERE state = 'queued' "
        "AND name NOT IN (SELECT value FROM json_each(?)) GROUP BY name ORDER BY name",
        (_json_list(names),),
    ).fetchall()
    return {_text(name): count for name, count in rows}


def leave(connection: sqlite3.Connection, owner: int, keep: Sequence[int]) -> None:
    """This process is done: release its rows, but for ``keep`` (tasks abandoned in
    their threads, which may still be running: they wait for the lease to expire); and
    if it keeps none, unregister it."""
    connection.execute(
        "UPDATE tasks SET owner = NULL, started = 0 WHERE owner = ? "
        "AND id NOT IN (SELECT value FROM json_each(?))",
        (owner, _json_list(keep)),
    )
    if not keep:
        connection.execute("DELETE FROM owners WHERE id = ?", (owner,))


def plant_unreadable(connection: sqlite3.Connection, name: str) -> int:
    """Queue a task ``name`` whose arguments are not text, as a damaged page may leave
    them (the crash drill's poison); its id."""
    with journal_schema.transaction(connection):
        return int(
            connection.execute(
                "INSERT INTO tasks (name, arguments, created) "
                "VALUES (?, CAST(X'5b5bff5d2c7b7d5d' AS TEXT), ?) RETURNING id",
                (name, time.time()),
            ).fetchone()[0]
        )


# -- what the journal command does ---------------------------------------------------


def rows(
    connection: sqlite3.Connection,
    *,
    state: str | None = None,
    ids: Sequence[int | str] | None = None,
    limit: int = -1,
) -> list[Row]:
    """The journal's tasks, oldest first: all, those in ``state``, or those of ``ids``
    (row ids, or task ids); the first ``limit`` of them (-1: all). Text that is not
    UTF-8 (a damaged row) comes with replacement characters."""
    query = (
        "SELECT id, CAST(name AS BLOB), CAST(arguments AS BLOB), attempt, state, owner, "
        "created, CAST(error AS BLOB), started, sent, task_id, progress, message FROM tasks"
    )
    clauses, parameters = _where(state, ids)
    return [
        Row(
            id,
            _text(name),
            _text(arguments),
            attempt,
            state,
            owner,
            created,
            None if error is None else _text(error),
            bool(started),
            sent,
            task_id,
            progress,
            message,
        )
        for (
            id,
            name,
            arguments,
            attempt,
            state,
            owner,
            created,
            error,
            started,
            sent,
            task_id,
            progress,
            message,
        ) in connection.execute(f"{query}{clauses} ORDER BY id LIMIT ?", [*parameters, limit])
    ]


def withdraw(connection: sqlite3.Connection, task_id: str) -> bool:
    """Delete the row of task ``task_id`` if it is queued and unclaimed (in the
    transaction of the journal's thread)."""
    deleted = connection.execute(
        "DELETE FROM tasks WHERE task_id = ? AND state = 'queued' AND owner IS NULL "
        "AND sent IS NULL",
        (task_id,),
    ).rowcount
    return deleted == 1


def find(connection: sqlite3.Connection, task_id: str) -> Row | EndedRow | None:
    """The row of the task whose id is ``task_id`` if the journal has one, else what it
    kept of it once it ended, if anything."""
    found = rows(connection, ids=[task_id])
    if found:
        return found[0]
    ended = connection.execute(
        "SELECT task_id, CAST(name AS BLOB), state, attempt, progress, message, result, "
        "CAST(error AS BLOB), created, started, ended FROM ended WHERE task_id = ?",
        (task_id,),
    ).fetchone()
    if ended is None:
        return None
    id, name, state, attempt, progress, message, result, error, created, started, at = ended
    return EndedRow(
        id,
        _text(name),
        state,
        attempt,
        progress,
        message,
        result,
        None if error is None else _text(error),
        created,
        started,
        at,
    )


def counts(connection: sqlite3.Connection) -> dict[str, int]:
    """How many rows the journal holds: ``queued`` (to run here, or to hand off),
    ``dead`` (dead letters), ``outbox`` (of the queued, remote tasks Redis does not
    have yet) and ``ended`` (statuses kept)."""
    queued, dead, outbox = connection.execute(
        "SELECT count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = "
        "'dead'), count(*) FILTER (WHERE state = 'queued' AND sent IS NULL AND "
        "name LIKE ?) FROM tasks",
        (REMOTE_PREFIX + "%",),
    ).fetchone()
    (ended,) = connection.execute("SELECT count(*) FROM ended").fetchone()
    return {"queued": queued, "dead": dead, "outbox": outbox, "ended": ended}


def queued(connection: sqlite3.Connection) -> int:
    """How many tasks are queued (claimed or not): those still to run."""
    count: int = connection.execute("SELECT count(*) FROM tasks WHERE state = 'queued'").fetchone()[
        0
    ]
    return count


def requeue(connection: sqlite3.Connection, ids: Sequence[int | str] | None) -> int:
    """Queue dead letters (those of ``ids``, or all for None) again, from their first
    attempt, in a transaction of their own; how many."""
    with journal_schema.transaction(connection):
        return requeue_dead(connection, ids)


def purge(connection: sqlite3.Connection, ids: Sequence[int | str] | None) -> int:
    """Delete dead letters (those of ``ids``, or all for None), in a transaction of
    their own; how many."""
    with journal_schema.transaction(connection):
        return purge_dead(connection, ids)


def requeue_dead(connection: sqlite3.Connection, ids: Sequence[int | str] | None) -> int:
    """`requeue`'s statement, in the caller's transaction."""
    clauses, parameters = _where("dead", ids)
    return connection.execute(
        f"UPDATE tasks SET state = 'queued', attempt = 1, started = 0, owner = NULL, "
        f"error = NULL, progress = NULL, message = NULL{clauses}",
        parameters,
    ).rowcount


def purge_dead(connection: sqlite3.Connection, ids: Sequence[int | str] | None) -> int:
    """`purge`'s statement, in the caller's transaction."""
    clauses, parameters = _where("dead", ids)
    return connection.execute(f"DELETE FROM tasks{clauses}", parameters).rowcount


def _where(state: str | None, ids: Sequence[int | str] | None) -> tuple[str, list[object]]:
    clauses: list[str] = []
    parameters: list[object] = []
    if state is not None:
        clauses.append("state = ?")
        parameters.append(state)
    if ids is not None:
        clauses.append(
            "(id IN (SELECT value FROM json_each(?))"
            " OR task_id IN (SELECT value FROM json_each(?)))"
        )
        parameters.append(_json_list(id for id in ids if isinstance(id, int)))
        parameters.append(_json_list(id for id in ids if isinstance(id, str)))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), parameters


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _json_list(values: Iterable[object]) -> str:
    return json.dumps(list(values))
