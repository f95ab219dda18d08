"""The parent process of ``python -m trio_bg serve --workers N``: it binds the sockets,
runs N worker processes that share them, turns its signals into commands to every
worker, replaces a worker that dies while serving, and waits for every drain.

Hypercorn's own ``-w N`` supervisor, on SIGTERM, waits for the first worker to exit
and then terminates the others mid-drain; this one never cuts a worker short.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.utils import repr_socket_addr

from .._engine.report import ShutdownReport, report_from_json
from .._running.worker_numbers import DIRECTORY_VARIABLE, WORKER_VARIABLE
from .._web.serve import CANCEL, READY, SIGNALS, STOP, on_signals

MIN_UPTIME = 1.0
"""Seconds a worker must have lived for a replacement when it dies while serving; one
that dies sooner, or before it serves, is not replaced: the supervisor shuts down."""

logger = logging.getLogger("trio_bg")


@dataclass(frozen=True, slots=True)
class WorkerExit:
    """How one worker process ended: ``exit_status`` is its return code (negative: the
    number of the signal that killed it), ``report`` its `ShutdownReport` (None if it
    wrote none: its tasks are unaccounted for)."""

    pid: int
    exit_status: int
    report: ShutdownReport | None


async def supervise(
    command: Sequence[str], config: Config, workers: int, *, name: str
) -> list[WorkerExit]:
    """Serve with ``workers`` processes until SIGTERM or SIGINT, and return how each
    worker that ran ended, in the order they ended.

    The sockets of ``config.bind`` are bound here; each worker runs ``command`` (a
    ``serve`` command line for `serve_worker`) with them as ``--bind=fd://N``, a
    ``--report-json`` of its own, and a socket to this process as stdin. The first
    signal sends every worker `STOP`, later ones `CANCEL`; then the supervisor waits for
    all of them, with no deadline of its own (Hypercorn's ``shutdown_timeout`` bounds
    each). ``name`` is the app's, for the log.
    """
    # Opened first: a signal during the start is a shutdown, not Python's default.
    with trio.open_signal_receiver(*SIGNALS) as signals:
        sockets = config.create_sockets()
        listening = sockets.secure_sockets + sockets.insecure_sockets
        try:
            for sock in listening:
                sock.listen(config.backlog)
            addresses = [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in listening]
            with tempfile.TemporaryDirectory(prefix="trio_bg-") as directory:
                supervisor = _Supervisor(
                    [*command, *(f"--bind=fd://{sock.fileno()}" for sock in listening)],
                    [sock.fileno() for sock in listening],
                    Path(directory),
                    workers,
                    f"serving {name} on {', '.join(addresses)} with {workers} workers",
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(supervisor.on_signals, signals)
                    async with trio.open_nursery() as slots:
                        for number in range(1, workers + 1):
                            slots.start_soon(supervisor.run_slot, number)
                    nursery.cancel_scope.cancel()
        finally:
            for sock in listening:
                sock.close()
    return supervisor.exits


def combined(exits: Sequence[WorkerExit]) -> ShutdownReport:
    """The workers' reports added up: every count summed, ``unfinished`` and
    ``unfinished_ids`` joined, ``duration`` the longest (the workers drain at the same
    time)."""
    reports = [worker.report for worker in exits if worker.report is not None]
    values: dict[str, Any] = {}
    for field in fields(ShutdownReport):
        parts = [getattr(report, field.name) for report in reports]
        if field.name == "duration":
            values[field.name] = max(parts, default=0.0)
        elif field.name in ("unfinished", "unfinished_ids"):
            values[field.name] = tuple(item for part in parts for item in part)
        else:
            values[field.name] = sum(parts)
    return ShutdownReport(**values)


def describe_exit(status: int) -> str:
    """A return code in words: ``exit status 3``, ``killed by SIGKILL``."""
    if status >= 0:
        return f"exit status {status}"
    try:
        return f"killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"killed by signal {-status}"


class _Supervisor:
    def __init__(
        self, command: list[str], fds: list[int], directory: Path, workers: int, serving: str
    ) -> None:
        self.exits: list[WorkerExit] = []
        self._command = command
        self._fds = fds
        self._directory = directory
        self._numbers = directory / "numbers"
        self._numbers.mkdir()
        self._workers = workers
        self._serving = serving  # logged once the first ``workers`` are ready
        self._lives = itertools.count(1)
        self._controls: dict[int, socket.socket] = {}  # pid: our end of its stdin
        self._ready = 0
        self._stopping = False
        self._cancelling = False

    async def on_signals(self, signals: AsyncIterator[int]) -> None:
        await on_signals(signals, self._first_signal, self._signal_again)

    def _first_signal(self, name: str) -> None:
        logger.info(
            "%s received: stopping the workers gracefully (send it again to cancel their "
            "background tasks at once)",
            name,
        )
        self._stop()

    def _signal_again(self, name: str) -> None:
        logger.warning("%s received again: the workers cancel their background tasks", name)
        self._cancelling = True
        self._command_all(CANCEL)

    async def run_slot(self, number: int) -> None:
        """Run worker ``number``, and its replacements (of the same number) while serving."""
        while not self._stopping:
            started = trio.current_time()
            pid, ready, status = await self._run_worker(number)
            if self._stopping:
                return
            uptime = trio.current_time() - started
            if not ready or uptime < MIN_UPTIME:
                logger.error(
                    "worker %d ended %.1fs after it started%s (%s): not replacing it; stopping",
                    pid,
                    uptime,
                    "" if ready else ", before it served",
                    describe_exit(status),
                )
                self._stop()
                return
            logger.error(
                "worker %d ended while serving (%s): starting a replacement",
                pid,
                describe_exit(status),
            )

    async def _run_worker(self, number: int) -> tuple[int, bool, int]:
        """Start worker ``number`` and wait for it to end: its pid, whether it served,
        its status."""
        report_path = self._directory / f"worker-{next(self._lives)}.json"
        # Where the workers share their numbers for the metrics (see worker_numbers).
        numbers = {DIRECTORY_VARIABLE: str(self._numbers), WORKER_VARIABLE: str(number)}
        ours, theirs = socket.socketpair()
        with ours:
            with theirs:
                process = await trio.lowlevel.open_process(
                    [*self._command, f"--report-json={report_path}"],
                    stdin=theirs.fileno(),
                    pass_fds=self._fds,
                    env=os.environ | numbers,
                )
            logger.info("started worker %d", process.pid)
            self._controls[process.pid] = ours
            if self._stopping:  # a signal came while it was being started
                _command(ours, STOP)
                if self._cancelling:
                    _command(ours, CANCEL)
            ready = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._wait_until_ready, process.pid, ours, ready)
                    status = await process.wait()
                    nursery.cancel_scope.cancel()
            finally:
                del self._controls[process.pid]
        self.exits.append(WorkerExit(process.pid, status, _read_report(report_path)))
        return process.pid, ready.is_set(), status

    async def _wait_until_ready(self, pid: int, control: socket.socket, ready: trio.Event) -> None:
        if not await _receive_ready(trio.socket.from_stdlib_socket(control)):
            return
        ready.set()
        self._ready += 1
        if self._ready == self._workers:
            logger.info("%s", self._serving)
        else:
            logger.info("worker %d serves", pid)

    def _stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._command_all(STOP)

    def _command_all(self, command: bytes) -> None:
        for control in self._controls.values():
            _command(control, command)


def _command(control: socket.socket, command: bytes) -> None:
    # Sent without awaiting: a few bytes never fill the socket's buffer, and so two
    # tasks never interleave their commands.
    with contextlib.suppress(OSError):  # the worker is gone: its end is reported
        control.send(command + b"\n")


async def _receive_ready(control: trio.socket.SocketType) -> bool:
    """Wait for the worker's `READY`; False if its stdin ends first."""
    received = b""
    while b"\n" not in received:
        try:
            data = await control.recv(64)
        except OSError:
            return False
        if not data:
            return False
        received += data
    return received.split(b"\n", 1)[0] == READY


def _read_report(path: Path) -> ShutdownReport | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.error("cannot read a worker's report %s: %s", path, error)
        return None
    try:
        return report_from_json(data)
    except (KeyError, TypeError) as error:
        logger.error("a worker's report is malformed: %s", error)
        return None
