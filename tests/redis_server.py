"""A real ``redis-server`` for the tests: started on a free loopback port, in a temporary
directory, stopped (and its files left to pytest's tmp_path) after.

Without ``redis-server`` on the PATH the tests that need it are skipped, saying how to
install it; ``.ci/run`` installs it and sets ``TRIO_BG_TESTS_NEED_REDIS=1``, which makes
a missing server a failure instead.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

BOUND = 20.0
"""Seconds Redis may take to start or stop before the test fails."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; `stop` and `start` again keep its port
    and its directory (with ``appendonly``, what it held survives the restart). With
    ``password`` it refuses clients that do not give it."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool,
        password: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.extra = extra  # more of redis-server's options
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it, and return once it accepts connections (it says so on stdout)."""
        assert self.process is None
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "no",
                "--logfile", "",
                "--daemonize", "no",
                *(("--requirepass", self.password) if self.password else ()),
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.process.stdout is not None
        output = b""
        deadline = time.monotonic() + BOUND
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"Ready to accept connections" not in output:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.kill()
                    raise AssertionError(f"redis-server did not start:\n{output.decode()}")
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"redis-server exited:\n{output.decode()}")
                output += chunk
        # From here on nobody reads its output: let it go nowhere.
        self.process.stdout.close()

    def stop(self) -> None:
        """SIGTERM (Redis writes its append-only file and exits), and wait for it."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(BOUND)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(BOUND)
            self.process = None


def redis_server_or_skip(
    directory: Path,
    *,
    appendonly: bool = False,
    password: str | None = None,
    extra: Sequence[str] = (),
) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("TRIO_BG_TESTS_NEED_REDIS"):
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(directory, appendonly=appendonly, password=password, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh Redis for one test (nothing persisted)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    yield from redis_server_or_skip(directory)


@pytest.fixture
def durable_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh Redis whose data survives `RedisServer.stop` and `RedisServer.start`."""
    directory = tmp_path / "durable-redis"
    directory.mkdir()
    yield from redis_server_or_skip(directory, appendonly=True)
