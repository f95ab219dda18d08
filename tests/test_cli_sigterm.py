"""The CLI path: ``hypercorn --worker-class trio examples.raw_asgi:app`` in a subprocess,
a few requests, SIGTERM to Hypercorn (the parent process, which runs the app in one
worker child), and the log shows the background tasks drained and reported before
the app's own shutdown.

Bounded throughout: every wait is under ``trio.fail_after``, and the process group
(Hypercorn and its worker) is killed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio
from conftest import Output

REPO = Path(__file__).resolve().parent.parent
NAMES = ("ada", "bob", "cy")


async def test_sigterm_to_hypercorn_drains_and_reports_the_background_tasks() -> None:
    command = [sys.executable, "-m", "hypercorn", "--worker-class", "trio"]
    command += ["--bind", "127.0.0.1:0", "examples.raw_asgi:app"]
    output = Output()
    process = await trio.lowlevel.open_process(
        command,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group: Hypercorn and its worker
    )
    assert process.stdout is not None
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(output.collect, process.stdout)
                # Port 0: Hypercorn binds a free port and logs it once it listens
                # (after the lifespan startup completed).
                (running,) = await output.wait_for(r"Running on http://127\.0\.0\.1:(\d+)")
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running[1]}") as client:
                    for name in NAMES:
                        response = await client.get("/", params={"name": name})
                        assert response.status_code == 200
                        assert name in response.text
                for name in NAMES:  # wait until every task has started
                    await output.wait_for(f"sending a welcome e-mail to {name}$")
                    await output.wait_for(f"writing the audit record for {name}$")
                # Graceful: Hypercorn tells its worker to shut down (SIGTERM to the
                # worker itself would kill it outright).
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a no-op unless the test failed
        with trio.move_on_after(5):
            await process.wait()

    log = output.text
    report = re.search(
        r"trio_bg: background tasks shut down: (\d+) accepted \((\d+) completed\) in ([\d.]+)s$",
        log,
        re.MULTILINE,
    )
    assert report is not None, log
    accepted, completed, duration = int(report[1]), int(report[2]), float(report[3])
    assert accepted == completed == 2 * len(NAMES), log  # two tasks per request
    # The tasks (1 s of e-mail) were still running when the drain began: it waited.
    assert duration > 0, log
    for name in NAMES:
        for line in (f"sent a welcome e-mail to {name}", f"wrote the audit record for {name}"):
            assert 0 <= log.find(line) < report.start(), (line, log)
    # The app's own lifespan shutdown ran after the drain.
    assert log.find("app shutdown") > report.end(), log
