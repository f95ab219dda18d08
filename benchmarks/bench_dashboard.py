"""11. The dashboard: the CPU one refresh of its live state costs the server, with 10,000
ended statuses kept, live tasks and a journal; and so what a page left open by ten
browsers costs (each polls every second; one look is shared for half a second)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
import trio
import trio.testing

import trio_bg
import trio_bg.dashboard
from trio_bg._web.asgi import Receive, Scope, Send

from .section import Section, Table, median, verdict

KEPT = 10_000
"""Ended statuses kept while the dashboard is asked."""

LIVE = 100
"""Tasks running while it is asked."""

TEN_PAGES_TARGET = 0.05
"""Share of one core that ten open pages may take (polling every second)."""


async def _noop() -> None:
    pass


async def _forever() -> None:
    trio_bg.set_progress(0.5, "half way")
    await trio.sleep_forever()


def _served(journal: Path) -> trio_bg.BackgroundTaskMiddleware:
    dashboard = trio_bg.dashboard.app(public=True)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith("/dash"):
            inner = dict(scope, root_path="/dash", path=scope["path"].removeprefix("/dash"))
            await dashboard(inner, receive, send)
            return
        tasks = trio_bg.current_tasks()
        added = {"/ended": (_noop, KEPT), "/running": (_forever, LIVE)}.get(scope["path"])
        if added is not None:
            func, count = added
            for _ in range(count):
                tasks.add_task(func)
        status = 404 if added is None else 202
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return trio_bg.BackgroundTaskMiddleware(
        app, journal=journal, statuses_kept=KEPT, max_pending=KEPT, grace_period=0
    )


async def _cpu_per_request(
    client: httpx.AsyncClient, path: str, requests: int, headers: dict[str, str]
) -> float:
    """CPU µs per request of ``path`` (process time: this process serves and asks)."""
    started = time.process_time()
    for _ in range(requests):
        await client.get(path, headers=headers)
    return (time.process_time() - started) / requests * 1e6


async def _measure(requests: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="trio_bg_bench_") as directory:
        app = _served(Path(directory) / "tasks.db")
        transport = httpx.ASGITransport(app=app)
        async with (
            _Lifespan(app),
            httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
        ):
            await client.get("/dash/state.json")  # recording starts
            await client.post("/ended")
            await client.post("/running")
            await trio.testing.wait_all_tasks_blocked()
            state = (await client.get("/dash/state.json")).json()
            if state["counts"]["completed"] != KEPT or state["counts"]["running"] != LIVE:
                raise RuntimeError(f"unexpected counts: {state['counts']}")
            etag = (await client.get("/dash/state.json")).headers["etag"]
            return {
                "a request answered 404 (the baseline)": await _cpu_per_request(
                    client, "/nothing", requests, {}
                ),
                "state.json, a fresh look": await _cpu_per_request(
                    client, "/dash/state.json", requests, {"cache-control": "no-cache"}
                ),
                "state.json, the shared look": await _cpu_per_request(
                    client, "/dash/state.json", requests, {}
                ),
                "state.json, unchanged (304)": await _cpu_per_request(
                    client, "/dash/state.json", requests, {"if-none-match": etag}
                ),
                "the first page (rendered)": await _cpu_per_request(
                    client, "/dash/", max(1, requests // 10), {}
                ),
            }


class _Lifespan:
    """The app's lifespan, run by hand (httpx's transport sends none)."""

    def __init__(self, app: trio_bg.BackgroundTaskMiddleware) -> None:
        self.app = app
        self.nursery: trio.Nursery | None = None
        self.to_app, self.from_test = trio.open_memory_channel[dict[str, str]](1)
        self.to_test, self.from_app = trio.open_memory_channel[dict[str, str]](1)

    async def __aenter__(self) -> None:
        self.manager = trio.open_nursery()
        self.nursery = await self.manager.__aenter__()
        self.nursery.start_soon(
            self.app, {"type": "lifespan"}, self.from_test.receive, self.to_test.send
        )
        await self.to_app.send({"type": "lifespan.startup"})
        await self.from_app.receive()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.to_app.send({"type": "lifespan.shutdown"})
        await self.from_app.receive()
        await self.manager.__aexit__(None, None, None)


def run(*, reps: int, requests: int = 200) -> Section:
    """CPU per request of each, median of ``reps`` runs; ten pages' share of a core."""
    runs = [trio.run(_measure, requests) for _ in range(reps)]
    table = Table(["", "CPU µs/request", "over the baseline"])
    baseline = median([r["a request answered 404 (the baseline)"] for r in runs])
    costs = {name: median([r[name] for r in runs]) for name in runs[0]}
    for name, cost in costs.items():
        table.add(name, f"{cost:,.0f}", "-" if cost == baseline else f"{cost - baseline:,.0f}")
    # Ten pages poll every second: two fresh looks a second (shared for 0.5 s), the other
    # eight polls served the shared look (or a 304: cheaper still).
    fresh = costs["state.json, a fresh look"]
    shared = costs["state.json, the shared look"]
    ten_pages = (2 * fresh + 8 * shared) / 1e6
    table.add(
        "ten open pages, each polling every second",
        f"{ten_pages * 1e6:,.0f} per second",
        f"{ten_pages:.1%} of a core " + verdict(ten_pages <= TEN_PAGES_TARGET, "≤ 5 %"),
    )
    return Section(
        title=f"11. Dashboard: CPU per refresh with {KEPT:,} ended statuses kept, {LIVE} "
        f"tasks running and a journal; {reps} reps of {requests} requests",
        table=table,
        notes=[
            "In-process, through httpx's ASGI transport (its cost is in every row: compare "
            "with the baseline, a request the app answers 404 at once). A fresh look reads "
            "the nursery, its recorder and the journal's counts and dead letters; within "
            "half a second every page gets the same look; a page whose state has not "
            "changed gets a 304.",
        ],
    )
