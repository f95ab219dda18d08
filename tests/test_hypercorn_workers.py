"""``hypercorn --worker-class trio -w 2`` itself: on SIGTERM, Hypercorn's parent waits for
the first worker to exit and then SIGTERMs the other mid-drain. trio_bg keeps that
SIGTERM from killing a draining worker, so every task within the grace period completes.

Real processes and real signals: the app is ``worker_app:app`` (one worker's tasks
short, the other's long). Every wait is bounded; the process group is killed whatever
happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio
from conftest import Output

TESTS = Path(__file__).parent
BOUND = 30.0


async def load_both_workers(url: str, enough: int) -> Counter[str]:
    """Requests (a new connection each, so both workers take some) until each role has
    answered ``enough`` of them; bounded in count."""
    answered: Counter[str] = Counter()
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False) as client:
        for _ in range(400):
            if min(answered["long"], answered["short"]) >= enough:
                return answered
            response = await client.get("/")
            assert response.status_code == 200
            answered[json.loads(response.text)["role"]] += 1
    raise AssertionError(f"both workers never answered {enough} requests: {answered}")


async def sigterm_hypercorn_w_2(
    tmp_path: Path, target: str, **extra_env: str
) -> tuple[int, str, Counter[str]]:
    """Serve ``worker_app:app`` with ``hypercorn --worker-class trio -w 2`` (``extra_env``
    in its environment), load both workers, then SIGTERM the ``target``: the exit status, the
    output, and how many requests each role answered."""
    command = [sys.executable, "-m", "hypercorn", "--worker-class", "trio", "-w", "2"]
    command += ["--bind", "127.0.0.1:0", "worker_app:app"]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TRIO_BG_TEST_ROLES": str(tmp_path),
        "TRIO_BG_TEST_LONG": "2.5",
        "TRIO_BG_TEST_SHORT": "0.05",
        **extra_env,
    }
    output = Output()
    process = await trio.lowlevel.open_process(
        command,
        cwd=TESTS,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group of its own: the parent and its workers
    )
    assert process.stdout is not None
    try:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(output.collect, process.stdout)
                await output.wait_for(r"worker pid=\d+ role=", count=2)
                running = await output.wait_for(r"Running on http://127\.0\.0\.1:(\d+)")
                answered = await load_both_workers(f"http://127.0.0.1:{running[0][1]}", 5)
                if target == "parent":
                    process.send_signal(signal.SIGTERM)
                else:  # systemd's KillMode=control-group, `kill -TERM -PGID`
                    os.killpg(process.pid, signal.SIGTERM)
                status = await process.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a no-op unless the test failed
        with trio.move_on_after(5):
            await process.wait()
    return status, output.text, answered


@pytest.mark.parametrize("target", ["parent", "process group"])
async def test_sigterm_drains_every_worker_of_hypercorn_w_2(tmp_path: Path, target: str) -> None:
    status, log, answered = await sigterm_hypercorn_w_2(tmp_path, target)
    assert status == 0, log
    reports = re.findall(
        r"background tasks shut down: (\d+) accepted \((\d+) completed\)", log, re.MULTILINE
    )
    assert len(reports) == 2, log  # the long worker's report too: it was not killed
    assert sum(int(accepted) for accepted, _ in reports) == sum(answered.values()), log
    assert all(accepted == completed for accepted, completed in reports), log
    done = Counter(re.findall(r"task done: pid=\d+ role=(\w+)", log))
    assert done == answered, log
    assert "SIGTERM to Hypercorn worker" in log  # the parent's terminate(), ignored


async def test_plain_hypercorn_shows_each_report_and_each_ignored_sigterm_once(
    tmp_path: Path,
) -> None:
    """No logging set up, as under plain ``hypercorn``: the complete shutdowns' reports
    (INFO) appear all the same, on Hypercorn's error log; and the long worker, which
    Hypercorn's parent terminate()s after the process group's SIGTERM, says once that
    it ignores SIGTERM."""
    status, log, answered = await sigterm_hypercorn_w_2(
        tmp_path, "process group", TRIO_BG_TEST_NO_LOGGING_SETUP="1"
    )
    assert status == 0, log
    reports = re.findall(
        r"\[(\d+)\] \[INFO\] background tasks shut down: (\d+) accepted \((\d+) completed\)", log
    )
    assert len({pid for pid, _, _ in reports}) == len(reports) == 2, log
    assert sum(int(accepted) for _, accepted, _ in reports) == sum(answered.values()), log
    assert all(accepted == completed for _, accepted, completed in reports), log
    ignored = Counter(re.findall(r"^SIGTERM to Hypercorn worker (\d+) ignored", log, re.MULTILINE))
    assert sorted(ignored.values()) == [1, 1], log
