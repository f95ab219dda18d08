"""The processes of the distributed drill: started in a session of their own, their
output read line by line (the last warnings and errors kept), stopped for sure; and
the drill's own ``redis-server``."""

from __future__ import annotations

import re
import subprocess
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..supervisor import describe_exit
from .harness import KILL_WAIT, LOG_TAIL_LINES, STARTUP_TIMEOUT, reap

REDIS_READY = "Ready to accept connections"

# What a process's log tail leaves out: lines at INFO and below (streaq's line for each
# task), in logging's format or Redis's.
_CHATTER = re.compile(r"^\S+ \S+ \[\d+\] (?:DEBUG|INFO) |^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.*-] ")


@dataclass(frozen=True, eq=False)
class Child:
    """A process of the drill's; ``ready`` is set by the first line of its output
    saying so, ``ended`` once its output ends (it exited); ``tail`` keeps its last
    lines above INFO."""

    name: str
    process: trio.Process
    ready: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))


class Processes:
    """Every process the drill started, and the nursery that reads their output."""

    def __init__(self, nursery: trio.Nursery, env: dict[str, str]) -> None:
        """Read the output in ``nursery``; start the processes with ``env``."""
        self._nursery = nursery
        self._env = env
        self.started: list[Child] = []
        self.blamed: list[Child] = []
        """The processes that failed: their last lines go in the result."""
        self.logs: dict[str, tuple[str, ...]] = {}
        """The last lines of those that failed, by name, once `stop_all` returned."""

    async def start(self, name: str, command: list[str], ready: str | None = None) -> Child:
        """Start ``command``; its output (stdout and stderr) is read line by line."""
        process = await trio.lowlevel.open_process(
            command,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl+C meant for the drill is not theirs
        )
        child = Child(name, process)
        self.started.append(child)
        self._nursery.start_soon(self._read, child, ready)
        return child

    async def _read(self, child: Child, ready: str | None) -> None:
        assert child.process.stdout is not None
        pending = b""
        try:
            async with child.process.stdout as output:
                while data := await output.receive_some():
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        _take(child, line, ready)
            if pending:
                _take(child, pending, ready)
        finally:
            child.ended.set()

    async def wait_ready(self, child: Child) -> str | None:
        """Wait until ``child`` says it is ready; return a problem, or None."""
        with trio.move_on_after(STARTUP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for event in (child.ready, child.ended):
                    nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)
        if child.ready.is_set():
            return None
        self.blame(child)
        if child.ended.is_set():
            with trio.move_on_after(KILL_WAIT):
                status = await child.process.wait()
                return f"{child.name} exited during startup ({describe_exit(status)})"
        return f"{child.name} did not start within {STARTUP_TIMEOUT:g}s"

    def blame(self, child: Child) -> None:
        """Show ``child``'s last lines with the outcome: it failed."""
        if child not in self.blamed:
            self.blamed.append(child)

    async def stop_all(self) -> None:
        """Kill whatever still runs, and wait for it (shielded, bounded); keep the last
        lines of those that failed."""
        for child in self.started:
            await reap(child.process)
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT):
            for child in self.blamed:
                await child.ended.wait()  # every line read
        for child in self.blamed:
            self.logs[f"{child.name} (pid {child.process.pid})"] = tuple(child.tail)


def _take(child: Child, raw: bytes, ready: str | None) -> None:
    line = raw.decode(errors="replace").rstrip()
    if ready is not None and ready in line:
        child.ready.set()
    if not _CHATTER.match(line):
        child.tail.append(line)


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class RedisServer:
    """The drill's own ``redis-server``: persistent (each write synced to the disk
    before Redis answers it), so it can be killed and started again, holding all it
    acknowledged; or, unless ``persists``, keeping nothing across a restart."""

    def __init__(
        self, port: int | None, persists: bool, directory: Path, processes: Processes
    ) -> None:
        """Serve on ``port`` of 127.0.0.1, with its files in ``directory/redis``."""
        self._port = port
        self._persists = persists
        self._directory = directory / "redis"
        self._directory.mkdir()
        self._processes = processes
        self._child: Child | None = None

    @property
    def pid(self) -> int | None:
        """The running server's pid."""
        return None if self._child is None else self._child.process.pid

    async def start(self) -> str | None:
        """Start it, and wait until it accepts connections; return a problem, or None."""
        command = [
            "redis-server",
            "--port", str(self._port),
            "--bind", "127.0.0.1",
            "--dir", str(self._directory),
            "--save", "",
            "--appendonly", "yes" if self._persists else "no",
            "--appendfsync", "always",
            "--logfile", "",
            "--daemonize", "no",
        ]  # fmt: skip
        self._child = await self._processes.start("redis", command, REDIS_READY)
        return await self._processes.wait_ready(self._child)

    async def kill(self) -> None:
        """SIGKILL it, and wait for it."""
        if self._child is not None:
            await reap(self._child.process)
            self._child = None

    async def stop(self) -> None:
        """SIGTERM it, and wait for it (killed if it lingers)."""
        if self._child is not None:
            self._child.process.terminate()
            with trio.move_on_after(KILL_WAIT):
                await self._child.process.wait()
            await self.kill()
