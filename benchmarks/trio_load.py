"""A small, bounded HTTP/1.1 keep-alive load generator on trio (used when wrk is missing).

``python -m benchmarks.trio_load URL CONNECTIONS SECONDS`` prints one result line in
the format of ``wrk_report.lua``. It speaks just enough HTTP/1.1 for the benchmark
apps: responses with a ``content-length`` and no chunking. It is far slower than wrk,
so on a small machine it can become the bottleneck and compress the ratios.
"""

from __future__ import annotations

import json
import sys
import time
from urllib.parse import urlsplit

import trio

MAX_HEADER = 64 * 1024


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}


async def _read_response(stream: trio.SocketStream, buffer: bytearray) -> int:
    """Read one response off ``stream`` (leftovers stay in ``buffer``); return its status."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEADER:
            raise ValueError("response head too large")
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        buffer += chunk
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    total = end + 4 + length
    while len(buffer) < total:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        buffer += chunk
    del buffer[:total]
    return status


async def _connection(host: str, port: int, request: bytes, deadline: float, tally: Tally) -> None:
    clock = time.perf_counter
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        tally.errors["connect"] += 1
        return
    buffer = bytearray()
    async with stream:
        while clock() < deadline:
            started = clock()
            try:
                await stream.send_all(request)
            except (OSError, trio.BrokenResourceError):
                tally.errors["write"] += 1
                return
            try:
                status = await _read_response(stream, buffer)
            except (OSError, EOFError, ValueError, trio.BrokenResourceError):
                tally.errors["read"] += 1
                return
            tally.latencies.append(clock() - started)
            if not 200 <= status < 400:
                tally.errors["status"] += 1


async def run(url: str, connections: int, seconds: float) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    tally = Tally()
    started = time.perf_counter()
    deadline = started + seconds
    with trio.move_on_after(seconds + 10):  # a hung server cannot hang the benchmark
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(_connection, host, port, request, deadline, tally)
    duration = time.perf_counter() - started
    latencies = sorted(tally.latencies) or [0.0]

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6

    return {
        "requests": len(tally.latencies),
        "duration_us": duration * 1e6,
        "p50_us": percentile(50),
        "p99_us": percentile(99),
        **tally.errors,
    }


def main() -> None:
    url, connections, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    print("TRIO_BG_BENCH", json.dumps(trio.run(run, url, connections, seconds)))


if __name__ == "__main__":
    main()
