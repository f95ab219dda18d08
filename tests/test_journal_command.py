"""``python -m trio_bg journal ls|retry|purge``, run on real journal files: what it
prints, its exit status, and what the journal holds afterwards."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import datetime
from pathlib import Path

import pytest

from trio_bg._cli import journal_command as _journal_command
from trio_bg._cli.main import main
from trio_bg._keeping import journal_file, journal_schema

EMAIL = "alice@example.com"  # personal data in a task's arguments
ERROR = (
    "Traceback (most recent call last):\n"
    '  File "app.py", line 3, in charge\n'
    "ValueError: the card was declined by the bank, for a reason that takes many words\n"
)


def build(path: Path, *, queued: int = 0, claimed: int = 0, dead: int = 0) -> list[int]:
    """A journal with ``claimed`` queued tasks claimed by a live process, then
    ``queued`` nobody's, then ``dead`` dead letters; their ids, in that order."""
    with closing(journal_schema.connect(str(path))) as connection:
        owner = journal_file.join(connection, lease=3600)
        with journal_schema.transaction(connection):
            ids = journal_file.append(
                connection,
                owner,
                [("send_mail", json.dumps([[EMAIL], {}]), 1)] * (claimed + queued)
                + [("charge", json.dumps([[12], {"card": "4111"}]), 3)] * dead,
            )
            for id in ids[claimed + queued :]:
                journal_file.bury(connection, owner, id, ERROR)
            journal_file.leave(connection, owner, keep=ids[:claimed])
    return ids


def stored(path: Path) -> dict[int, journal_file.Row]:
    with closing(journal_schema.connect(str(path))) as connection:
        return {row.id: row for row in journal_file.rows(connection)}


def run(*argv: str) -> int:
    return main(["journal", *argv])


def table(out: str) -> dict[str, list[str]]:
    """The rows of ``ls``'s table by id (header: ``ID``), each split into its cells."""
    return {line.split()[0]: line.split() for line in out.splitlines()[:-1]}


# -- ls ------------------------------------------------------------------------------


def test_ls_of_an_empty_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.db"
    build(path)
    assert run("ls", "--journal", str(path)) == 0
    assert capsys.readouterr() == ("0 queued (0 claimed by a process), 0 dead\n", "")


def test_ls_lists_every_task_and_counts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tasks.db"
    claimed, queued, dead = build(path, claimed=1, queued=1, dead=1)
    assert run("ls", "--journal", str(path)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[-1] == "2 queued (1 claimed by a process), 1 dead"
    rows = table(out)
    assert rows["ID"] == ["ID", "STATE", "NAME", "ATTEMPT", "OWNER", "CREATED", "ERROR", "TASK_ID"]
    row = stored(path)[claimed]
    created = datetime.fromtimestamp(row.created).isoformat(timespec="seconds")
    owner = str(row.owner)
    no_id = "-"  # (rows written without a task id)
    assert rows[str(claimed)] == [
        str(claimed),
        "queued",
        "send_mail",
        "1",
        owner,
        created,
        "-",
        no_id,
    ]
    assert rows[str(queued)] == [str(queued), "queued", "send_mail", "1", "-", created, "-", no_id]
    assert rows[str(dead)][:5] == [str(dead), "dead", "charge", "3", "-"]
    # The error's last line only, cut short.
    error = " ".join(rows[str(dead)][6:-1])
    assert error.startswith("ValueError: the card was declined")
    assert error.endswith("...")
    assert len(error) == _journal_command.ERROR_WIDTH
    assert "Traceback" not in out


def test_ls_never_shows_arguments_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tasks.db"
    build(path, queued=1, dead=1)
    assert run("ls", "--journal", str(path)) == 0
    assert run("ls", "--journal", str(path), "--json") == 0
    out = capsys.readouterr().out
    assert EMAIL not in out
    assert "4111" not in out
    assert "ARGUMENTS" not in out

    assert run("ls", "--journal", str(path), "--show-arguments") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[-1] == "ARGUMENTS"
    assert f'[["{EMAIL}"],{{}}]' in out.replace(" ", "")
    assert '[[12],{"card":"4111"}]' in out.replace(" ", "")


def test_show_arguments_help_warns_of_personal_data(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        run("ls", "--help")
    assert exit.value.code == 0
    help = " ".join(capsys.readouterr().out.split())
    assert "--show-arguments" in help
    assert "personal data" in help


def test_ls_of_one_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.db"
    _, dead = build(path, queued=1, dead=1)
    assert run("ls", "--journal", str(path), "--state", "dead") == 0
    out = capsys.readouterr().out
    assert set(table(out)) == {"ID", str(dead)}
    assert out.splitlines()[-1] == "1 queued (0 claimed by a process), 1 dead"  # the journal's


def test_ls_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.db"
    claimed, dead = build(path, claimed=1, dead=1)
    rows = stored(path)
    assert run("ls", "--journal", str(path), "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [
        {
            "id": claimed,
            "state": "queued",
            "name": "send_mail",
            "attempt": 1,
            "owner": rows[claimed].owner,
            "created": rows[claimed].created,
            "error": None,
            "task_id": None,
        },
        {
            "id": dead,
            "state": "dead",
            "name": "charge",
            "attempt": 3,
            "owner": None,
            "created": rows[dead].created,
            "error": ERROR,
            "task_id": None,
        },
    ]
    assert rows[claimed].owner is not None

    assert run("ls", "--journal", str(path), "--json", "--show-arguments", "--state", "dead") == 0
    [listed_dead] = json.loads(capsys.readouterr().out)
    assert listed_dead["id"] == dead
    assert listed_dead["arguments"] == [[12], {"card": "4111"}]


# -- retry, purge --------------------------------------------------------------------


def assert_requeued(row: journal_file.Row) -> None:
    assert (row.state, row.attempt, row.owner, row.error) == ("queued", 1, None, None)


def test_retry_given_dead_letters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.db"
    queued, first, second, third = build(path, queued=1, dead=3)
    assert run("retry", "--journal", str(path), str(first), str(third)) == 0
    assert capsys.readouterr() == ("re-queued 2 dead letters\n", "")
    rows = stored(path)
    assert_requeued(rows[first])
    assert_requeued(rows[third])
    assert (rows[second].state, rows[second].attempt, rows[second].error) == ("dead", 3, ERROR)
    assert rows[queued].state == "queued"


def test_retry_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.db"
    claimed, *dead = build(path, claimed=1, dead=2)
    before = stored(path)[claimed]
    assert run("retry", "--journal", str(path), "--all") == 0
    assert capsys.readouterr().out == "re-queued 2 dead letters\n"
    rows = stored(path)
    for id in dead:
        assert_requeued(rows[id])
    assert rows[claimed] == before  # its claim stands


@pytest.mark.parametrize("action", ["retry", "purge"])
def test_ids_that_are_not_dead_letters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    path = tmp_path / "tasks.db"
    queued, first, second = build(path, queued=1, dead=2)
    # None given is a dead letter: the others are not touched either.
    assert run(action, "--journal", str(path), str(queued), "99") == 1
    out, err = capsys.readouterr()
    assert out == f"{'re-queued' if action == 'retry' else 'deleted'} 0 dead letters\n"
    assert f"task {queued} is queued, not a dead letter" in err
    assert "task 99 is not in the journal" in err
    rows = stored(path)
    assert [rows[id].state for id in (queued, first, second)] == ["queued", "dead", "dead"]

    # One is: it alone changes.
    assert run(action, "--journal", str(path), str(first), str(queued)) == 1
    out, err = capsys.readouterr()
    assert out.endswith(" 1 dead letter\n")
    assert f"task {queued} is queued" in err
    rows = stored(path)
    if action == "retry":
        assert_requeued(rows[first])
    else:
        assert first not in rows
    assert rows[second].state == "dead"


def test_purge_deletes_dead_letters_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tasks.db"
    claimed, queued, first, second, third = build(path, claimed=1, queued=1, dead=3)
    assert run("purge", "--journal", str(path), str(second)) == 0
    assert capsys.readouterr() == ("deleted 1 dead letter\n", "")
    assert set(stored(path)) == {claimed, queued, first, third}

    assert run("purge", "--journal", str(path), "--all") == 0
    assert capsys.readouterr().out == "deleted 2 dead letters\n"
    assert set(stored(path)) == {claimed, queued}


@pytest.mark.parametrize("action", ["retry", "purge"])
@pytest.mark.parametrize("given", [[], ["--all", "1"]], ids=["neither", "both"])
def test_ids_or_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str, given: list[str]
) -> None:
    path = tmp_path / "tasks.db"
    [dead] = build(path, dead=1)
    with pytest.raises(SystemExit) as exit:
        run(action, "--journal", str(path), *given)
    assert exit.value.code == 2
    assert "give the ids of the dead letters, or --all" in capsys.readouterr().err
    assert stored(path)[dead].state == "dead"


# -- journals it cannot use ------------------------------------------------------------


ACTIONS = [["ls"], ["retry", "--all"], ["purge", "--all"]]


@pytest.mark.parametrize("action", ACTIONS, ids=lambda action: action[0])
def test_no_journal_at_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    path = tmp_path / "tasks.db"
    assert run(action[0], "--journal", str(path), *action[1:]) == 2
    assert capsys.readouterr() == ("", f"python -m trio_bg journal: error: no journal at {path}\n")
    assert list(tmp_path.iterdir()) == []  # nor its -wal, -shm


def test_an_empty_file_is_not_made_a_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tasks.db"
    path.touch()
    assert run("ls", "--journal", str(path)) == 2
    assert "tasks.db is empty, not a trio_bg journal" in capsys.readouterr().err
    assert path.read_bytes() == b""


def test_a_file_that_is_not_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    text = b"these are my notes, not a database\n" * 100
    path.write_bytes(text)
    assert run("ls", "--journal", str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("python -m trio_bg journal: error: ")
    assert "not a trio_bg journal" in err
    assert path.read_bytes() == text


def test_a_database_of_something_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
        connection.commit()
    assert run("purge", "--journal", str(path), "--all") == 2
    assert f"{path} is not a trio_bg journal" in capsys.readouterr().err


def test_a_newer_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tasks.db"
    [dead] = build(path, dead=1)
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA user_version = 99")
    assert run("retry", "--journal", str(path), str(dead)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "has schema version 99, newer than this trio_bg knows" in err
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT state FROM tasks").fetchall() == [("dead",)]


def test_a_locked_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tasks.db"
    [dead] = build(path, dead=1)
    monkeypatch.setattr(_journal_command, "BUSY_TIMEOUT", 0.05)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process writing
        assert run("retry", "--journal", str(path), "--all") == 2
        other.execute("ROLLBACK")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"python -m trio_bg journal: error: the journal {path}: ")
    assert "locked" in err
    assert stored(path)[dead].state == "dead"
