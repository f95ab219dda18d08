"""One Hypercorn server (trio worker) in a subprocess: start, wait until ready, stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from .apps.counting import COUNT_PATH
from .pinning import pinned

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class ServerError(RuntimeError):
    """The server did not start, or did not answer."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """``python -m hypercorn --worker-class trio -w 1`` serving ``target``.

    A context manager: entering starts the server in a session of its own (so that
    the worker process can be killed with it) and waits until ``GET /count``
    answers, i.e. the worker has finished its lifespan startup; leaving sends
    SIGTERM, waits up to `STOP_TIMEOUT`, then SIGKILLs the whole process group.
    Access logging is off (Hypercorn's default); its error log goes to a temp file
    that is shown if the server fails.
    """

    def __init__(self, target: str, *, cpu: int | None) -> None:
        self.target = target
        self.port = free_port()
        self._cpu = cpu
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 -- closed by stop()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> Self:
        command = [sys.executable, "-m", "hypercorn", "--worker-class", "trio", "-w", "1"]
        command += ["--bind", f"127.0.0.1:{self.port}", "--graceful-timeout", "1", self.target]
        self._process = subprocess.Popen(
            pinned(command, self._cpu),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise ServerError(f"{self.target} exited at start:\n{self.log_tail()}")
            try:
                self.counts()
                return
            except (OSError, http.client.HTTPException, ValueError):
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"{self.target} not ready after {START_TIMEOUT:.0f}s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def counts(self) -> dict[str, int]:
        """The app's counts from ``GET /count`` (see `benchmarks.apps.counting`)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
        try:
            connection.request("GET", COUNT_PATH)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise ServerError(f"GET {COUNT_PATH} answered {response.status}")
        finally:
            connection.close()
        counts = json.loads(body)
        return {str(key): int(value) for key, value in counts.items()}

    def stop(self) -> None:
        """SIGTERM (graceful), a bounded wait, then SIGKILL to the process group."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):  # the worker, had it outlived us
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        self._log.seek(0)
        return "".join(self._log.readlines()[-lines:])
