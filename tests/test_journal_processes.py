"""Durable tasks across processes: real servers (``python -m trio_bg serve
journal_app:app --journal ...``), real SIGKILLs and SIGTERMs, one journal file.

Every wait is bounded; every child process is killed on the way out.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from processes import BOUND, TESTS, Child, trio_bg_process
from redis_server import free_port

LEASE = 1.0
"""The servers' journal lease: a dead process's rows are resumed within about this."""


@dataclass
class Server(Child):
    url: str
    report_path: Path

    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.report_path.read_text())
        return data


@asynccontextmanager
async def journal_server(
    tmp_path: Path,
    journal: Path,
    *options: str,
    name: str = "server",
    task_seconds: float = 0.0,
    prefix: tuple[str, ...] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[Server]:
    """``python -m trio_bg serve journal_app:app --journal JOURNAL`` on a free port;
    yielded once it accepts connections."""
    port = free_port()
    report_path = tmp_path / f"{name}-report.json"
    async with trio_bg_process(
        "serve",
        "journal_app:app",
        f"--bind=127.0.0.1:{port}",
        f"--journal={journal}",
        f"--journal-lease={LEASE}",
        f"--report-json={report_path}",
        "--log-level=info",
        *options,
        ready="Running on http://127.0.0.1",
        env={
            "TRIO_BG_TEST_LEDGER": str(tmp_path / "ledger"),
            "TRIO_BG_TEST_TASK_SECONDS": str(task_seconds),
        },
        prefix=prefix,
        preexec_fn=preexec_fn,
    ) as child:
        yield Server(child.process, child.output, f"http://127.0.0.1:{port}", report_path)


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=BOUND)


def ledger(tmp_path: Path) -> Counter[str]:
    """How many times each task ran, by key; and by whom: ``ledger_lines``."""
    return Counter(line.split()[0] for line in ledger_lines(tmp_path))


def ledger_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "ledger"
    return path.read_text().splitlines() if path.exists() else []


async def wait_until_ran(tmp_path: Path, keys: set[str]) -> None:
    """Return once every task of ``keys`` is in the ledger (the caller bounds it)."""
    # The ledger is a file that other processes append to: there is no event to wait on.
    while not keys <= set(ledger(tmp_path)):  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_sigkill_mid_load_then_restart_runs_every_answered_task(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    answered: set[str] = set()
    enough = trio.Event()

    async def load(http: httpx.AsyncClient, worker: int) -> None:
        for number in range(1000):
            key = f"w{worker}-{number}"
            try:
                response = await http.get("/", params={"key": key})
            except httpx.HTTPError:
                return  # the server was killed under this request
            assert response.status_code == 200
            answered.add(key)
            if len(answered) >= 60:
                enough.set()

    async with (
        journal_server(tmp_path, journal, task_seconds=0.5) as first,
        client(first.url) as http,
    ):
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                for worker in range(6):
                    nursery.start_soon(load, http, worker)
                await enough.wait()
                first.process.kill()  # mid-load: requests are still under way
    assert first.process.returncode == -signal.SIGKILL
    ran_before = set(ledger(tmp_path))
    assert len(answered - ran_before) >= 10, "the kill cut no task short: nothing to check"

    async with journal_server(tmp_path, journal, name="second") as second:
        with trio.fail_after(BOUND):
            await wait_until_ran(tmp_path, answered)
        assert await second.stop() == 0
    report = second.report()
    assert report["recovered"] >= len(answered - ran_before)
    assert report["deferred"] == 0
    runs = ledger(tmp_path)
    assert all(runs[key] >= 1 for key in answered)  # at least once; a few perhaps twice


async def test_a_dead_processs_rows_are_resumed_by_another_within_the_lease(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    keys = {f"held-{number}" for number in range(8)}
    async with (
        journal_server(tmp_path, journal, name="a") as a,
        journal_server(tmp_path, journal, name="b") as b,
        client(a.url) as http,
    ):
        with trio.fail_after(BOUND):
            for key in keys:  # held by a: they never end there
                assert (await http.get("/", params={"key": key, "hold": "1"})).status_code == 200
        # While a lives (and renews its lease), b never takes its rows: b would run
        # them at once. Two and a half leases of nothing, then.
        await trio.sleep(2.5 * LEASE)
        assert ledger_lines(tmp_path) == []

        a.process.kill()
        killed_at = trio.current_time()
        with trio.fail_after(LEASE + 5):
            await wait_until_ran(tmp_path, keys)
        resumed_after = trio.current_time() - killed_at
        assert {line.split()[1] for line in ledger_lines(tmp_path)} == {str(b.process.pid)}
        assert await b.stop() == 0
    assert ledger(tmp_path) == Counter(dict.fromkeys(keys, 1))
    assert b.report()["recovered"] == len(keys)
    assert resumed_after <= LEASE + 5


async def test_sigterm_with_too_short_a_grace_period_defers_then_the_next_start_resumes(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "tasks.db"
    keys = {f"long-{number}" for number in range(5)}
    async with (
        journal_server(tmp_path, journal, "--grace-period=0.2") as first,
        client(first.url) as http,
    ):
        with trio.fail_after(BOUND):
            for key in keys:
                assert (await http.get("/", params={"key": key, "hold": "1"})).status_code == 200
        assert await first.stop() == 1  # some tasks did not complete
    report = first.report()
    assert (report["cancelled"], report["deferred"]) == (5, 5)
    assert ledger_lines(tmp_path) == []

    async with journal_server(tmp_path, journal, name="second") as second:
        with trio.fail_after(BOUND):  # released at the first's exit: no lease to wait out
            await wait_until_ran(tmp_path, keys)
        assert await second.stop() == 0
    assert second.report()["recovered"] == 5
    assert ledger(tmp_path) == Counter(dict.fromkeys(keys, 1))


def limit_file_size() -> None:
    """In the child: files may grow to 256 KiB (the journal's WAL soon hits that), and
    a write past it fails (EFBIG) instead of killing the process (SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


async def test_a_full_disk_mid_run_answers_503_and_loses_no_answered_task(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    statuses: list[int] = []
    answered: set[str] = set()
    async with (
        journal_server(tmp_path, journal, preexec_fn=limit_file_size) as server,
        client(server.url) as http,
    ):
        with trio.fail_after(BOUND):
            for number in range(400):
                response = await http.get("/", params={"key": f"k{number}"})
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert (
                        response.text == "Service Unavailable: the background task journal failed\n"
                    )
                    break
                answered.add(f"k{number}")
            await server.output.wait_for("failed to keep them")
            await wait_until_ran(tmp_path, answered)
    assert statuses[-1] == 503 and statuses.count(503) == 1
    assert len(answered) >= 5


def drop_root_powers() -> tuple[str, ...]:
    """A command prefix that makes root subject to file permissions, as anyone else."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("as root, a read-only directory needs setpriv to mean anything")
    return (
        "setpriv",
        "--bounding-set=-dac_override,-dac_read_search",
        "--inh-caps=-dac_override,-dac_read_search",
    )


async def test_a_journal_in_a_read_only_directory_is_refused_at_startup(tmp_path: Path) -> None:
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    prefix = drop_root_powers()
    try:
        result = await trio.run_process(
            [
                *prefix,
                sys.executable,
                "-m",
                "trio_bg",
                "serve",
                "journal_app:app",
                f"--journal={directory / 'tasks.db'}",
            ],
            cwd=TESTS,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    finally:
        directory.chmod(0o755)
    assert result.returncode == 2
    assert f"its directory {directory} is not writable" in result.stderr.decode()
    assert list(directory.iterdir()) == []


async def test_workers_share_one_journal_and_defer_into_it(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    keys = {f"held-{number}" for number in range(8)}
    async with (
        journal_server(tmp_path, journal, "--workers=2", "--grace-period=0.2") as workers,
        client(workers.url) as http,
    ):
        with trio.fail_after(BOUND):
            for key in keys:
                response = await http.get("/", params={"key": key, "hold": "1"})
                assert response.status_code == 200
        assert await workers.stop() == 1, workers.output.text  # held tasks cut short
    report = workers.report()
    assert (report["deferred"], report["cancelled"]) == (8, 8)
    assert sum(worker["report"]["deferred"] for worker in report["workers"]) == 8

    async with journal_server(tmp_path, journal, name="next") as following:
        with trio.fail_after(BOUND):
            await wait_until_ran(tmp_path, keys)
        assert await following.stop() == 0
    assert following.report()["recovered"] == 8
    assert ledger(tmp_path) == Counter(dict.fromkeys(keys, 1))


def _open_at_once(path: str, barrier: Any, results: Any) -> None:
    from trio_bg._keeping import journal_file as _journal_file
    from trio_bg._keeping import journal_schema as _journal_schema

    barrier.wait()
    try:
        connection = _journal_schema.connect(path)
        _journal_file.join(connection, LEASE)
        connection.close()
        results.put("ok")
    except Exception as error:
        results.put(repr(error))


def test_processes_starting_at_once_on_a_new_journal_all_open_it(tmp_path: Path) -> None:
    """One creates it, under the write lock, in one transaction; the others wait and
    see it whole (not "not a journal", "table exists" or "locked")."""
    context = multiprocessing.get_context("fork")
    for attempt in range(10):
        path = str(tmp_path / f"tasks-{attempt}.db")
        barrier, results = context.Barrier(3), context.Queue()
        processes = [
            context.Process(target=_open_at_once, args=(path, barrier, results)) for _ in range(3)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=BOUND) for _ in processes]
        for process in processes:
            process.join(BOUND)
        assert outcomes == ["ok"] * 3


async def test_two_processes_sharing_a_journal_store_a_keyed_task_once(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    async with (
        journal_server(tmp_path, journal, "--grace-period=0", name="first") as first,
        journal_server(tmp_path, journal, "--grace-period=0", name="second") as second,
    ):
        async with client(first.url) as http:
            one = (await http.get("/keyed", params={"key": "7", "hold": "1"})).text
        async with client(second.url) as http:
            two = (await http.get("/keyed", params={"key": "7"})).text
        assert two == one  # the id made of the key: the same in both processes
        assert await second.stop() == 0
        second_report = second.report()
        assert (second_report["accepted"], second_report["deduplicated"]) == (0, 1)
        assert await first.stop() == 1  # its task never ends: cut short, deferred
    with closing(sqlite3.connect(journal)) as connection:
        rows = connection.execute("SELECT task_id FROM tasks").fetchall()
    assert rows == [(one,)]
    assert "7" not in ledger(tmp_path)


async def test_a_task_another_process_runs_is_waited_for_and_its_status_read(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "tasks.db"
    async with (
        journal_server(tmp_path, journal, name="first", task_seconds=0.5) as first,
        journal_server(tmp_path, journal, name="second") as second,
    ):
        async with client(first.url) as http:
            task_id = (await http.get("/keyed", params={"key": "8"})).text
        async with client(second.url) as http:  # waits in the journal for the first's task
            answer = await http.get("/wait", params={"id": task_id}, timeout=BOUND)
        assert answer.status_code == 200, answer.text
        status = answer.json()
        assert (status["id"], status["state"]) == (task_id, "completed")
        assert status["ended_at"] is not None
        assert "8" in ledger(tmp_path)  # it ran, once, in the first process
        assert await first.stop() == 0 and await second.stop() == 0
