"""The journal's file modes: its rows hold task arguments, so the journal and its -wal
and -shm files are its owner's only (issue 18, item 8)."""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from processes import BOUND

import trio_bg
from trio_bg._keeping import journal_schema as _journal_schema

ran = trio.Event()


@trio_bg.task(name="tests.journal_modes.welcome", durable=True)
async def welcome(to: str) -> None:
    ran.set()


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    global ran
    ran = trio.Event()
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(path: Path) -> dict[str, int]:
    return {name: stat.S_IMODE(os.stat(f"{path}{name}").st_mode) for name in ("", "-wal", "-shm")}


async def test_a_new_journal_and_its_wal_and_shm_are_private(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with trio_bg.open_background_nursery(journal=path) as bg:
        bg.start_soon(welcome, "private@example.com")
        with trio.fail_after(BOUND):
            await ran.wait()
        assert modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    assert os.umask(0o022) == 0o022  # the process's umask is left alone


async def test_an_existing_journal_open_to_others_is_warned_about_and_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    _journal_schema.connect(str(path)).close()
    path.chmod(0o644)
    async with trio_bg.open_background_nursery(journal=path):
        assert modes(path) == {"": 0o644, "-wal": 0o644, "-shm": 0o644}
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert f"others than its owner may read or write {path}," in warning.message
    assert f"chmod 600 {path} {path}-wal {path}-shm" in warning.message
    with trio.fail_after(BOUND):
        await trio.run_process(
            [sys.executable, "-m", "trio_bg", "journal", "ls", f"--journal={path}"],
            capture_stdout=True,
            capture_stderr=True,
        )
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # nor does the journal command
