"""What makes an SQLite database a trio_bg journal, and opening one: its path checked,
the file created private to its owner, its schema created (or an older one upgraded in
place, keeping its rows), WAL mode and the ``synchronous`` level set, the database
checked whole. `journal_error` says what SQLite's errors mean for a journal, and every
write goes through `transaction`. Plain, blocking code, as are the statements run on an
open journal (`journal_file`).

Two tables. ``tasks`` holds one row per durable task not yet done: its registered
name, its JSON arguments, its attempt, whether that attempt has ``started``, which
process (``owner``) has claimed it, its ``task_id`` (the id of its `TaskHandle`: one row
per id, so that a second process adding a task with the same deduplication key adds
nothing), and the ``progress`` and ``message`` its task last set; dead letters (tasks
that failed their last attempt) stay with ``state = 'dead'``. ``ended`` keeps the
status of each task that ended (completed, or cancelled by `cancel_task`), by task id,
without its arguments, for every process to read until it is swept (the time it is
kept for is the nursery's ``journal_statuses_kept_for``); ``key_until`` holds a keyed
task's deduplication key past its end (its ``key_ttl``). ``owners`` holds one row per
live process, with the wall-clock time its lease expires. Ids are ``AUTOINCREMENT``: a
reused id could make one task look like another.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from .._errors import JournalError

APPLICATION_ID = 0x74726267  # "trbg", in the SQLite header: this file is a trio_bg journal
SCHEMA_VERSION = 4

MEMORY = ":memory:"
"""The path of a journal that lives in memory, for tests: durable only in name."""

ENDED_TABLE = """
CREATE TABLE ended (
    task_id   TEXT    PRIMARY KEY,
    name      TEXT    NOT NULL,
    state     TEXT    NOT NULL,
    attempt   INTEGER NOT NULL,
    progress  REAL,
    message   TEXT,
    result    TEXT,
    error     TEXT,
    created   REAL    NOT NULL,
    started   REAL,
    ended     REAL    NOT NULL,
    key_until REAL
) WITHOUT ROWID;
CREATE INDEX ended_by_time ON ended (ended);
"""

SCHEMA = f"""
CREATE TABLE tasks (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    name      TEXT    NOT NULL,
    arguments TEXT    NOT NULL,
    attempt   INTEGER NOT NULL DEFAULT 1,
    state     TEXT    NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'dead')),
    owner     INTEGER,
    created   REAL    NOT NULL,
    error     TEXT,
    started   INTEGER NOT NULL DEFAULT 0,
    sent      TEXT,
    task_id   TEXT,
    progress  REAL,
    message   TEXT
);
CREATE INDEX tasks_by_state ON tasks (state, owner, id);
CREATE UNIQUE INDEX tasks_by_task_id ON tasks (task_id);
{ENDED_TABLE}
CREATE TABLE owners (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    pid     INTEGER NOT NULL,
    host    TEXT    NOT NULL,
    expires REAL    NOT NULL
);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""

SYNCHRONOUS_LEVELS = ("full", "normal")


def connect(
    path: str, *, synchronous: str = "full", busy_timeout: float = 5.0, create: bool = True
) -> sqlite3.Connection:
    """Open the journal at ``path`` (creating it if need be, and ``create``), checked:
    `JournalError` saying what is wrong with a path, a file that is not a journal (or
    is a newer one's), a corrupt or locked database."""
    if synchronous not in SYNCHRONOUS_LEVELS:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_LEVELS}, not {synchronous!r}")
    if path != MEMORY and (problem := journal_path_problem(Path(path))):
        raise JournalError(f"cannot open the journal {path}: {problem}")
    if create and path != MEMORY:
        _create_private(path)
    try:
        connection = sqlite3.connect(
            path if create else f"file:{urllib.parse.quote(path)}?mode=rw",
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=not create,
        )
    except sqlite3.Error as error:
        raise JournalError(f"cannot open the journal {path}: {error}") from error
    # Switching a new journal to WAL mode needs the file to itself: a process starting
    # at the same moment may get "locked" at once, without SQLite's busy wait.
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            _prepare(connection, path, synchronous, create)
        except JournalError as error:
            if _locked(error) and time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            connection.close()
            raise
        except BaseException:
            connection.close()
            raise
        return connection


def _create_private(path: str) -> None:
    """Create ``path`` empty, readable and writable by its owner only, if it does not
    exist: its rows hold task arguments. SQLite gives its -wal and -shm files the
    journal's mode; the umask may narrow it, never widen it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as error:
        raise JournalError(f"cannot create the journal {path}: {error.strerror}") from error


def exposed(path: str) -> list[str]:
    """The journal's files (the journal, its -wal and -shm) that others than their
    owner may read or write."""
    if path == MEMORY:
        return []
    found = []
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_mode & 0o077:
                found.append(name)
    return found


def _locked(error: JournalError) -> bool:
    cause = error.__cause__
    return isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause)


def journal_path_problem(path: Path) -> str | None:
    """What makes ``path`` unusable for a journal, checked before SQLite is asked, or
    None."""
    directory = path.parent
    if not directory.is_dir():
        return f"its directory {directory} does not exist"
    if path.is_dir():
        return "it is a directory"
    # SQLite writes its -wal and -shm files beside the journal: the directory must be
    # writable, not just the file.
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"its directory {directory} is not writable"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return "the file is not readable and writable"
    return None


def _prepare(connection: sqlite3.Connection, path: str, synchronous: str, create: bool) -> None:
    try:
        application_id, version = _header(connection)
        if create and application_id != APPLICATION_ID:
            # Several processes may start on a new journal at once: under the write lock
            # one creates it, in one transaction (executescript would commit first), and
            # the others then see it whole.
            with transaction(connection):
                application_id, version = _header(connection)
                if (application_id, version) == (0, 0) and _is_empty(connection):
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    application_id, version = _header(connection)
        if application_id == version == 0 and _is_empty(connection):
            raise JournalError(f"{path} is empty, not a trio_bg journal")
        if application_id != APPLICATION_ID:
            raise JournalError(
                f"{path} is not a trio_bg journal (it is an SQLite database of something "
                f"else): give the journal a file of its own"
            )
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"the journal {path} has schema version {version}, newer than this trio_bg "
                f"knows ({SCHEMA_VERSION}): it was written by a newer trio_bg; upgrade "
                f"trio_bg to open it"
            )
        if version < SCHEMA_VERSION:
            _upgrade(connection)
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != MEMORY and mode != "wal":
            raise JournalError(
                f"cannot put the journal {path} in WAL mode (it stays in {mode} mode)"
            )
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        check = connection.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise JournalError(
                f"the journal {path} is corrupt ({check}); restore it or move it away"
            )
    except sqlite3.Error as error:
        raise journal_error(error, f"cannot open the journal {path}") from error


def _upgrade(connection: sqlite3.Connection) -> None:
    """Bring an older journal to this schema, in place, keeping its rows: under the
    write lock, so that of processes opening it at once only the first does it."""
    with transaction(connection):
        version = _header(connection)[1]
        if version < 2:
            connection.execute("ALTER TABLE tasks ADD COLUMN started INTEGER NOT NULL DEFAULT 0")
            connection.execute("ALTER TABLE tasks ADD COLUMN sent TEXT")
        if version < 3:  # each row gets a random id, as new tasks do
            connection.execute("ALTER TABLE tasks ADD COLUMN task_id TEXT")
            connection.execute("UPDATE tasks SET task_id = lower(hex(randomblob(16)))")
            connection.execute("CREATE UNIQUE INDEX tasks_by_task_id ON tasks (task_id)")
            connection.execute("ALTER TABLE tasks ADD COLUMN progress REAL")
            connection.execute("ALTER TABLE tasks ADD COLUMN message TEXT")
        if version < 4:
            for statement in ENDED_TABLE.split(";"):
                if statement.strip():
                    connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _header(connection: sqlite3.Connection) -> tuple[int, int]:
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    return application_id, version


def _is_empty(connection: sqlite3.Connection) -> bool:
    count: int = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    return count == 0


def journal_error(error: sqlite3.Error, doing: str) -> JournalError:
    """A `JournalError` that says what SQLite's ``error`` means for the journal."""
    text = str(error)
    if "file is not a database" in text:
        meaning = "the file is not a trio_bg journal (not an SQLite database at all)"
    elif "malformed" in text:
        meaning = "the database is corrupt; restore it or move it away"
    elif "locked" in text or "busy" in text:
        meaning = "the database is locked by another process for too long"
    elif "full" in text:
        meaning = "the disk is full"
    elif "readonly" in text or "read-only" in text:
        meaning = "the journal is read-only here"
    else:
        meaning = text
    if meaning != text:
        meaning = f"{meaning} ({text})"
    return JournalError(f"{doing}: {meaning}")


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): the write lock is
    taken up front, so two processes never deadlock upgrading a read to a write."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (a full disk, say): then there is nothing
        # to roll back, and the error that did it is the one to raise.
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise
