"""A drill's load: clients send requests, and part-way the server gets its signal."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import trio

if TYPE_CHECKING:
    from .harness import DrillPlan, Progress

TASKS_HEADER = "x-trio-bg-tasks"
"""The response header through which an app tells the drill how many tasks it added."""

DURABLE_HEADER = "x-trio-bg-durable"
"""The response header through which an app names (space-separated keys) the durable
tasks it added, for the crash drill's books."""

REMOTE_HEADER = "x-trio-bg-remote"
"""The response header through which an app names (space-separated keys) the remote
tasks it handed to streaq workers, for the distributed drill's books."""

REQUEST_TIMEOUT = 10.0


@dataclass(kw_only=True)
class Load:
    """What the clients saw; counted while the load runs."""

    sent: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    claimed: int = 0
    """Tasks the responses said they added (the sum of their `TASKS_HEADER`)."""
    unclaimed: int = 0
    """Answered responses without a (valid) `TASKS_HEADER`."""
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    durable: list[str] = field(default_factory=list)
    """The keys of the durable tasks that answered responses named (`DURABLE_HEADER`)."""
    remote: list[str] = field(default_factory=list)
    """The keys of the remote tasks that answered responses named (`REMOTE_HEADER`)."""

    def counts(self) -> dict[str, int]:
        """Requests sent, answered, refused and failed, as JSON data."""
        return {
            "sent": self.sent,
            "answered": self.answered,
            "refused": self.refused,
            "failed": self.failed,
        }

    def seen(self) -> dict[str, Any]:
        """The statuses and the errors the clients saw, as JSON data."""
        return {
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
            "errors": dict(self.errors),
        }

    @property
    def claims(self) -> bool:
        """Whether any answered response said how many tasks it added."""
        return self.answered > self.unclaimed


async def load_and_stop(
    plan: DrillPlan,
    process: trio.Process,
    port: int,
    load: Load,
    progress: Progress,
    stop: signal.Signals = signal.SIGTERM,
    alongside: Callable[[], Awaitable[object]] | None = None,
) -> tuple[float, float | None]:
    """Send the load, signal the server part-way (``stop``), and wait for it to exit.
    Return when the signal went out (seconds of load) and how long the server took to
    stop (None: it did not by the deadline, and was killed). ``alongside`` runs with
    the load from its start; the signal waits for it to return."""
    start = trio.current_time()
    all_sent = trio.Event()
    stop_sending = trio.Event()
    signal_sent_at: float | None = None

    def render() -> str:
        line = (
            f"{trio.current_time() - start:5.1f}s  requests: {load.sent}/{plan.requests} sent, "
            f"{load.answered} answered, {load.refused} refused, {load.failed} failed"
        )
        if signal_sent_at is not None:
            line += f"  |  {stop.name} sent {trio.current_time() - signal_sent_at:.1f}s ago"
        return line

    async with (
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=REQUEST_TIMEOUT,
            limits=httpx.Limits(max_connections=plan.concurrency),
            trust_env=False,  # never a proxy on the way to loopback
        ) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(progress.run, render)
        nursery.start_soon(_send_load, plan, client, load, stop_sending, all_sent)
        if alongside is not None:
            done = trio.Event()
            nursery.start_soon(_then_set, alongside, done)
        with trio.move_on_after(plan.signal_after):
            await all_sent.wait()
        if alongside is not None:
            await done.wait()
        stop_sending.set()  # requests under way finish; no new ones start
        process.send_signal(stop)
        signal_sent_at = trio.current_time()
        progress.milestone(
            f"drill: {stop.name} sent after {signal_sent_at - start:.2f}s, {load.sent} requests"
        )
        stopped_after: float | None = None
        with trio.move_on_after(plan.stop_deadline):
            await process.wait()
            stopped_after = trio.current_time() - signal_sent_at
        if stopped_after is None:
            process.kill()
            progress.milestone(f"drill: the server did not stop within {plan.stop_deadline:g}s")
        else:
            progress.milestone(
                f"drill: the server exited with status {process.returncode} after "
                f"{stopped_after:.2f}s"
            )
        await all_sent.wait()  # every request under way has ended (bounded by its timeout)
        nursery.cancel_scope.cancel()
    return signal_sent_at - start, stopped_after


async def _then_set(run: Callable[[], Awaitable[object]], done: trio.Event) -> None:
    await run()
    done.set()


async def _send_load(
    plan: DrillPlan,
    client: httpx.AsyncClient,
    load: Load,
    stop_sending: trio.Event,
    done: trio.Event,
) -> None:
    """Send up to ``plan.requests`` requests from ``plan.concurrency`` workers; set
    ``done`` once every worker has ended."""
    numbers = iter(range(plan.requests))
    start = trio.current_time()

    def send_time(number: int) -> float:
        return start + number / plan.rate if plan.rate else start

    try:
        async with trio.open_nursery() as workers:
            for _ in range(plan.concurrency):
                workers.start_soon(_client, client, load, numbers, send_time, stop_sending)
    finally:
        done.set()


async def _client(
    client: httpx.AsyncClient,
    load: Load,
    numbers: Iterator[int],
    send_time: Callable[[int], float],
    stop_sending: trio.Event,
) -> None:
    for number in numbers:
        await trio.sleep_until(send_time(number))
        if stop_sending.is_set():
            return
        load.sent += 1
        try:
            response = await client.get("/")
        except httpx.HTTPError as error:
            load.failed += 1
            load.errors[type(error).__name__] += 1
            continue
        load.statuses[response.status_code] += 1
        if response.status_code == 503:
            load.refused += 1
            continue
        load.answered += 1
        load.durable.extend(response.headers.get(DURABLE_HEADER, "").split())
        load.remote.extend(response.headers.get(REMOTE_HEADER, "").split())
        claimed = response.headers.get(TASKS_HEADER, "")
        if claimed.isdigit():
            load.claimed += int(claimed)
        else:
            load.unclaimed += 1


async def part_of_the_load(plan: DrillPlan, load: Load, start: float, part: float) -> None:
    """Return once ``part`` of the load is behind: of the seconds before the signal, or
    of the requests."""
    with trio.move_on_at(start + part * plan.signal_after):
        # The clients count in this thread, and tell no one: looked at every few ms.
        while load.sent < part * plan.requests:  # noqa: ASYNC110
            await trio.sleep(0.01)
