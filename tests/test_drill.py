"""``python -m trio_bg drill``: the books balance on the example app, and a broken app fails.

Each test runs the real command (which runs its server in a grandchild process) with a
small load and short grace periods. ``trio.run_process`` under ``trio.fail_after``
bounds every run; on a timeout it sends the drill SIGTERM, on which the drill kills
its server before exiting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio

BOUND = 30.0
"""Seconds one drill may take before the test fails (a noisy machine; typically ~1.5 s)."""

ROOT = Path(__file__).parent.parent

QUICK = (
    "--requests=30",
    "--concurrency=3",
    "--rate=0",
    "--signal-after=5",  # all 30 are sent well before: SIGTERM follows the last answer
    "--grace-period=0.5",
    "--graceful-timeout=1",
)


async def drill(app: str, *options: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    """Run ``python -m trio_bg drill APP OPTIONS``; return its status, stdout, stderr."""
    with trio.fail_after(BOUND):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bg", "drill", app, *options],
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_the_books_balance_on_the_example_app() -> None:
    status, out, err = await drill("examples.drill_app:app", *QUICK, "--json")
    assert status == 0, out + err
    result: dict[str, Any] = json.loads(out)
    assert result["verdict"] == "pass"
    assert result["problems"] == []
    requests = result["requests"]
    assert requests["sent"] == requests["answered"] == 30
    tasks = result["tasks"]
    report = tasks["report"]
    assert tasks["unaccounted"] == 0
    assert tasks["claimed"] == report["accepted"] > 60
    # Every outcome the example app is made to produce, each counted:
    assert report["completed"] > 0
    assert report["failed"] == 3  # requests 3, 13 and 23 call the flaky webhook
    assert report["cancelled"] >= 1  # request 7's search index outlives the grace period
    assert report["abandoned"] >= 1  # request 17's blocking export
    assert "rebuild_search_index" in report["unfinished"]
    assert result["server"]["exit_status"] == 1  # tasks were cut short: serve says so


async def test_the_table_shows_the_outcome() -> None:
    status, out, err = await drill("examples.drill_app:app", *QUICK)
    assert status == 0, out + err
    for row in ("sent", "answered", "refused (503)", "claimed by responses", "accepted"):
        assert f"    {row} " in out
    for row in ("completed", "timed out", "cancelled", "abandoned", "unaccounted", "drain"):
        assert f"    {row} " in out
    assert "cut short: " in out
    assert "verdict: PASS" in out
    assert "drill: SIGTERM sent after" in err  # progress goes to stderr


async def test_a_broken_app_that_loses_tasks_fails_loudly() -> None:
    status, out, err = await drill("examples.broken_app:app", *QUICK)
    assert status == 1, out + err
    assert "PROBLEM: 60 task(s) lost: 30 responses claimed 90 (x-trio-bg-tasks)" in out
    assert "the server accepted 30" in out
    assert "verdict: FAIL" in out


async def test_a_server_that_does_not_stop_in_time_is_killed_and_fails_the_drill() -> None:
    # Request 7 adds a task of 600 s; a grace period of 20 s outlasts the 1 s deadline.
    status, out, err = await drill(
        "examples.drill_app:app", *QUICK, "--grace-period=20", "--deadline=1", "--json"
    )
    assert status == 1, out + err
    result = json.loads(out)
    assert result["problems"] == [
        "the server did not stop within 1s of SIGTERM (it was killed); if that is shorter "
        "than its grace period, raise --deadline"
    ]
    assert result["server"]["stopped_after"] is None


async def test_without_the_header_only_the_balance_is_checked() -> None:
    status, out, err = await drill("test_serve:app", *QUICK, "--json", cwd=ROOT / "tests")
    assert status == 0, out + err
    result = json.loads(out)
    assert result["tasks"]["claimed"] is None
    assert result["notes"] == [
        "no response carried x-trio-bg-tasks: could not check that each answered request "
        "had its tasks accepted"
    ]


async def test_usage_errors_exit_2() -> None:
    status, _, err = await drill("examples.drill_app:app", "--requests=0")
    assert status == 2
    assert "--requests: must be > 0" in err


CRASH = (
    "--requests=40",
    "--concurrency=4",
    "--rate=40",
    "--signal-after=0.6",
    "--journal-lease=1",
    "--grace-period=2",
    "--graceful-timeout=1",
)


async def test_the_crash_drill_loses_no_durable_task_of_the_example_app(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    status, out, err = await drill(
        "examples.drill_app:app", *CRASH, f"--journal={journal}", "--kill", "--json"
    )
    assert status == 0, out + err
    result: dict[str, Any] = json.loads(out)
    assert result["verdict"] == "pass", result
    first, durable = result["first_life"], result["durable_tasks"]
    assert first["answered"] >= 10
    assert durable["claimed"] == 2 * first["answered"]  # two durable tasks a request
    assert durable["ran"] == durable["claimed"]
    assert durable["lost"] == []
    # The kill cut some short (receipts take up to a second): the second life ran them.
    assert result["second_life"]["report"]["recovered"] > 0
    assert "SIGKILL sent after" in err


async def test_the_crash_drill_fails_an_app_whose_tasks_die_with_it(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    status, out, err = await drill(
        "crash_app:app", *CRASH, f"--journal={journal}", "--kill", cwd=ROOT / "tests"
    )
    assert status == 1, out + err
    assert "durable task(s) named by answered requests never ran to the end" in out
    assert "verdict: FAIL" in out


async def test_the_crash_drill_needs_a_journal() -> None:
    status, _, err = await drill("examples.drill_app:app", "--kill")
    assert status == 2
    assert "--kill needs --journal" in err


async def test_the_crash_drill_with_poison_buries_it_and_runs_the_rest(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    status, out, err = await drill(
        "examples.drill_app:app", *CRASH, f"--journal={journal}", "--kill", "--poison", "--json"
    )
    assert status == 0, out + err
    result: dict[str, Any] = json.loads(out)
    assert result["verdict"] == "pass", result
    durable = result["durable_tasks"]
    assert durable["ran"] == durable["claimed"] > 0
    assert durable["lost"] == []
    [unreadable, deadly] = sorted(durable["dead_letters"], key=lambda letter: "died" in letter)
    assert unreadable.endswith(
        " drill.poison: cannot run from the journal: its arguments are not UTF-8"
    )
    assert deadly.endswith(
        " drill.poison: attempt 1: its process died while it ran, its last attempt"
    )
    assert "drill: planted task" in err


async def test_poison_needs_the_crash_drill_or_the_distributed_one() -> None:
    status, _, err = await drill("examples.drill_app:app", "--poison")
    assert status == 2
    assert "--poison needs --kill (the crash drill) or --redis" in err
