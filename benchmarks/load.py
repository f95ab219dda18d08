"""HTTP load generators: wrk when installed, else a bounded trio keep-alive client.

Both keep a fixed number of keep-alive connections busy for a fixed time, each
sending ``GET`` and waiting for the response before the next, and report the
requests answered, the errors, and the 50th and 99th latency percentiles.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .pinning import pinned

WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
MARKER = "TRIO_BG_BENCH "


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    duration: float
    """Seconds."""
    errors: int
    """Connection, read, write and timeout errors, and non-2xx/3xx answers."""
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0


class LoadError(RuntimeError):
    """The load generator itself failed."""


class LoadGenerator(Protocol):
    name: str

    def run(self, url: str, *, connections: int, duration: int) -> LoadResult: ...


def _parse(stdout: str, command: list[str]) -> LoadResult:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER) :])
            errors = sum(data[key] for key in ("connect", "read", "write", "status", "timeout"))
            return LoadResult(
                requests=data["requests"],
                duration=data["duration_us"] / 1e6,
                errors=errors,
                p50_ms=data["p50_us"] / 1e3,
                p99_ms=data["p99_us"] / 1e3,
            )
    raise LoadError(f"no result from {' '.join(command)}:\n{stdout[-2000:]}")


def _run(command: list[str], duration: int) -> LoadResult:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=duration + 30, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise LoadError(f"{' '.join(command)} did not finish in time") from error
    if done.returncode != 0:
        raise LoadError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return _parse(done.stdout, command)


class Wrk:
    """wrk, one thread, its latency percentiles read through `WRK_SCRIPT`."""

    def __init__(self, executable: str, cpu: int | None) -> None:
        self._executable = executable
        self._cpu = cpu
        version = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, check=False
        )
        self.name = (version.stdout or version.stderr).split(" [")[0].strip() or "wrk"

    def run(self, url: str, *, connections: int, duration: int) -> LoadResult:
        command = [self._executable, "-t", "1", "-c", str(connections), "-d", f"{duration}s"]
        command += ["--timeout", "5s", "-s", str(WRK_SCRIPT), url]
        return _run(pinned(command, self._cpu), duration)


class TrioLoad:
    """`benchmarks.trio_load` in a subprocess of its own (pinned like wrk would be)."""

    def __init__(self, cpu: int | None, reason: str) -> None:
        self._cpu = cpu
        self.name = f"built-in trio load generator, benchmarks/trio_load.py ({reason})"

    def run(self, url: str, *, connections: int, duration: int) -> LoadResult:
        command = [sys.executable, "-m", "benchmarks.trio_load", url, str(connections)]
        command.append(str(duration))
        return _run(pinned(command, self._cpu), duration)


def choose(preference: str, cpu: int | None) -> LoadGenerator:
    """``preference`` is "auto" (wrk if found), "wrk" (required) or "trio"."""
    executable = shutil.which("wrk")
    if preference == "trio":
        return TrioLoad(cpu, "asked for")
    if preference == "auto" and executable is None:
        return TrioLoad(cpu, "wrk not found; slower than wrk, it may compress the ratios")
    if executable is None:
        raise LoadError("wrk was asked for but is not installed")
    return Wrk(executable, cpu)
