"""Child processes for the tests: ``python -m trio_bg ...`` started in tests/, its output
collected from a pipe, killed on the way out whatever happened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from conftest import Output

BOUND = 20.0
"""Seconds any single wait may take before the test fails (generous: a noisy machine)."""

TESTS = Path(__file__).parent


@dataclass
class Child:
    process: trio.Process
    output: Output

    async def stop(self) -> int:
        """SIGTERM, and wait for the exit status."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(BOUND):
            return await self.process.wait()


@asynccontextmanager
async def trio_bg_process(
    *arguments: str,
    ready: str,
    env: dict[str, str],
    prefix: tuple[str, ...] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[Child]:
    """``python -m trio_bg ARGUMENTS...`` with ``env`` added to this process's
    environment; yielded once its output shows ``ready``."""
    process = await trio.lowlevel.open_process(
        [*prefix, sys.executable, "-m", "trio_bg", *arguments],
        cwd=TESTS,
        env=os.environ | env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )
    output = Output()
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(output.collect, process.stdout)
            with trio.fail_after(BOUND):
                await output.wait_for(ready)
            yield Child(process, output)
            if process.returncode is None:
                process.kill()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(BOUND):
            await process.wait()
