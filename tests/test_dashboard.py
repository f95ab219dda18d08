"""trio_bg.dashboard.app at the ASGI level: refused unguarded, authorize on every route,
the first page rendered on the server under both mount styles, the live JSON, the
actions (cancel, retry, purge) behind an Origin check and a token, read_only and
show_arguments. (tests/test_dashboard_browser.py drives it in a real browser.)"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import trio
import trio.testing
from conftest import asgi_client, run_lifespan
from redis_server import RedisServer
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import trio_bg
import trio_bg.dashboard
from trio_bg._web.asgi import ASGIApp, Receive, Scope, Send

SAME_ORIGIN = {"origin": "http://test"}
FRESH = {"cache-control": "no-cache"}  # a new look, not the one of the last half second
ACTIONS = ("/cancel", "/retry", "/purge")
NURSERY: dict[str, Any] = {"grace_period": 0, "journal": ":memory:", "journal_lease": 1}

ran: list[str] = []
failing: set[str] = set()


async def forever(name: str) -> None:
    trio_bg.set_progress(0.25, f"<b>{name}</b> is a quarter done")
    await trio.sleep_forever()


async def declined() -> None:
    raise ValueError("card <img src=x onerror=alert(1)> declined")


@trio_bg.task(name="tests.dashboard.charge", durable=True)
async def charge(address: str) -> None:
    ran.append(address)
    if address in failing:
        raise ValueError("no such mailbox")


async def add(kind: str) -> str:
    """Add a task of ``kind`` (a query string) to the request's tasks: its id."""
    kind = unquote(kind)
    if kind == "not-utf-8":  # a file name read from the disk: a lone surrogate in a str
        kind = "caf" + b"\xe9".decode("utf-8", "surrogateescape")
    tasks = trio_bg.current_tasks()
    if kind == "fail":
        return tasks.add_task(declined).id
    if kind.startswith("charge:"):
        return tasks.add_task(charge, kind.removeprefix("charge:")).id
    return tasks.add_task(forever, kind).id


def mounted_raw(dashboard: ASGIApp) -> trio_bg.BackgroundTaskMiddleware:
    """/dash/... goes to ``dashboard`` as a server's mount does it (the prefix moved
    from the path into root_path); ``POST /start?KIND`` adds a task."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].startswith("/dash"):
            inner = dict(scope, root_path="/dash", path=scope["path"][len("/dash") :])
            await dashboard(inner, receive, send)
            return
        task_id = await add(scope["query_string"].decode())
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": task_id.encode()})

    return trio_bg.BackgroundTaskMiddleware(
        app, grace_period=0, journal=":memory:", journal_lease=1
    )


def mounted_in_starlette(dashboard: ASGIApp) -> Starlette:
    """The same, as Starlette's Mount does it (the full path kept, root_path added)."""

    async def start(request: Request) -> PlainTextResponse:
        return PlainTextResponse(await add(request.url.query), status_code=202)

    return Starlette(
        routes=[Route("/start", start, methods=["POST"]), Mount("/dash", app=dashboard)],
        middleware=[Middleware(trio_bg.BackgroundTaskMiddleware, **NURSERY)],
    )


MOUNTS = {"root_path stripped": mounted_raw, "Starlette Mount": mounted_in_starlette}


@asynccontextmanager
async def dashboard_client(
    dashboard: ASGIApp, mount: Callable[[ASGIApp], ASGIApp] = mounted_raw
) -> AsyncIterator[httpx.AsyncClient]:
    app = mount(dashboard)
    async with run_lifespan(app), asgi_client(app) as client:
        yield client


async def started(client: httpx.AsyncClient, kind: str) -> str:
    response = await client.post(f"/start?{kind}")
    assert response.status_code == 202
    await trio.testing.wait_all_tasks_blocked()
    return response.text


def token_of(page: httpx.Response) -> str:
    found = re.search(r'data-token="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


async def settled(client: httpx.AsyncClient, until: Callable[[dict[str, Any]], bool]) -> Any:
    """The live state once ``until`` holds of it (the journal works in a thread)."""
    with trio.fail_after(10):
        while True:
            state = (await client.get("/dash/state.json", headers=FRESH)).json()
            if until(state):
                return state
            await trio.sleep(0.02)


def cells(state: dict[str, Any], table: str) -> list[list[Any]]:
    return [row["cells"] for row in state["tables"][table]["rows"]]


# -- made guarded, or not at all -------------------------------------------------------


def test_it_refuses_to_be_made_unguarded() -> None:
    with pytest.raises(ValueError, match="authorize"):
        trio_bg.dashboard.app()
    with pytest.raises(ValueError, match="authorize"):
        trio_bg.dashboard.app(read_only=True, show_arguments=False)
    with pytest.raises(TypeError, match="authorize"):
        trio_bg.dashboard.app(authorize="staff")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read_only"):
        trio_bg.dashboard.app(public=True, read_only="yes")  # type: ignore[arg-type]


def _staff(scope: Scope) -> bool:
    return dict(scope["headers"]).get(b"x-staff") == b"yes"


async def _staff_later(scope: Scope) -> bool:
    await trio.lowlevel.checkpoint()
    return _staff(scope)


@pytest.mark.parametrize("authorize", [_staff, _staff_later])
async def test_authorize_guards_every_route_the_live_updates_too(
    authorize: Callable[[Scope], bool | Awaitable[bool]],
) -> None:
    async with dashboard_client(trio_bg.dashboard.app(authorize=authorize)) as client:
        task_id = await started(client, "held")
        routes = ["/", "/state.json", "/dashboard.js", "/dashboard.css", "/nothing"]
        for route in routes:
            refused = await client.get(f"/dash{route}")
            assert refused.status_code == 403, route
            assert "held" not in refused.text
        for route in ACTIONS:
            refused = await client.post(f"/dash{route}", data={"id": task_id}, headers=SAME_ORIGIN)
            assert refused.status_code == 403
        staff = {"x-staff": "yes"}
        for route in routes[:4]:
            assert (await client.get(f"/dash{route}", headers=staff)).status_code == 200
        status = await client.get("/dash/state.json?name=forever", headers=staff)
        assert [row[0] for row in cells(status.json(), "live")] == ["forever"]
        assert (await client.get("/dash/nothing", headers=staff)).status_code == 404


# -- what it shows -------------------------------------------------------------------


@pytest.mark.parametrize("mount", MOUNTS.values(), ids=MOUNTS.keys())
async def test_the_first_page_shows_the_tasks_before_any_script_runs(
    mount: Callable[[ASGIApp], ASGIApp],
) -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True), mount) as client:
        held = await started(client, "held")
        failed = await started(client, "fail")
        page = await client.get("/dash/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        html = page.text
        assert 'href="/dash/dashboard.css?v=' in html and 'src="/dash/dashboard.js?v=' in html
        live = html[html.index('data-table="live"') : html.index('data-table="ended"')]
        assert f'data-key="{held}"' in live and '<th scope="row">forever</th>' in live
        assert "&lt;b&gt;held&lt;/b&gt; is a quarter done" in live  # escaped
        assert 'value="0.25"' in live and 'action="/dash/cancel"' in live
        ended = html[html.index('data-table="ended"') : html.index('data-table="names"')]
        assert f'data-key="{failed}"' in ended and 'class="badge b-failed"' in ended
        assert "card &lt;img src=x onerror=alert(1)&gt; declined" in ended
        assert "<img" not in html
        for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            served = await client.get(f"/dash/{asset}")
            assert served.headers["content-type"].startswith(kind)
            assert len(served.content) > 1000
        bare = await client.get("/dash", follow_redirects=True)  # (Starlette redirects)
        assert bare.status_code == 200 and f'data-key="{held}"' in bare.text


async def test_the_live_state_is_small_json_with_an_etag() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        await client.get("/dash/state.json")  # the first look: recording starts
        held = await started(client, "held")
        for _ in range(3):
            await started(client, "fail")
        state = await settled(client, lambda s: s["counts"]["failed"] == 3)
        assert state["counts"]["running"] == 1
        assert state["rates"]["failed"] == 3
        [(slot, completed, failed, cancelled)] = state["chart"]["bars"]
        assert (slot, completed, failed, cancelled) == (119, 0, 3, 0)
        assert [row["key"] for row in state["tables"]["live"]["rows"]] == [held]
        [declined_times] = [row for row in cells(state, "names") if row[0] == "declined"]
        assert declined_times[1:3] == [3, 3]  # ended, failed
        assert declined_times[3].endswith("ms")  # its p50
        response = await client.get("/dash/state.json")
        assert len(response.content) < 8_000
        etag = response.headers["etag"]
        again = await client.get("/dash/state.json", headers={"if-none-match": etag})
        assert (again.status_code, again.content) == (304, b"")
        await started(client, "fail")
        changed = await client.get("/dash/state.json", headers={"if-none-match": etag, **FRESH})
        assert changed.status_code == 200 and changed.headers["etag"] != etag


async def test_nothing_is_recorded_before_the_dashboards_first_look() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        await started(client, "fail")  # before any look: counted, not timed
        state = await settled(client, lambda s: s["counts"]["failed"] == 1)
        assert cells(state, "names") == [] and state["chart"]["bars"] == []
        await started(client, "fail")
        state = await settled(client, lambda s: s["counts"]["failed"] == 2)
        assert [row[:3] for row in cells(state, "names")] == [["declined", 1, 1]]


async def test_the_ended_tasks_filter_by_name_and_outcome() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        held = await started(client, "held")
        failed = await started(client, "fail")
        cancel = await client.post(
            "/dash/cancel",
            data={"id": held, "token": await _token(client)},
            headers={**SAME_ORIGIN, "accept": "application/json"},
        )
        assert cancel.json() == {"action": "cancel", "ids": [held], "done": 1}
        everything = await settled(client, lambda s: len(s["tables"]["ended"]["rows"]) == 2)
        newest_first = [row["key"] for row in everything["tables"]["ended"]["rows"]]
        assert newest_first == [held, failed]
        for query, expected in [
            ("outcome=failed", [failed]),
            ("outcome=cancelled", [held]),
            ("name=forever", [held]),
            ("name=forever&outcome=failed", []),
            ("outcome=nonsense", [held, failed]),  # an unknown outcome: no filter
        ]:
            state = (await client.get(f"/dash/state.json?{query}", headers=FRESH)).json()
            assert [row["key"] for row in state["tables"]["ended"]["rows"]] == expected, query
        page = await client.get("/dash/?outcome=failed")
        assert '<option value="failed" selected>' in page.text
        assert f'data-key="{held}"' not in page.text


# -- acting: cross-site requests refused -----------------------------------------------


async def _token(client: httpx.AsyncClient) -> str:
    return token_of(await client.get("/dash/"))


async def test_an_action_needs_the_same_origin_and_the_cookies_token() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        held = await started(client, "held")
        page = await client.get("/dash/")
        token = token_of(page)
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"trio_bg_dashboard={token}; Path=/dash;")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        form = {"id": held, "token": token}
        refused = [
            ({"origin": "http://evil.example"}, form),
            ({"origin": "null"}, form),
            ({"referer": "http://evil.example/dash/"}, form),
            ({}, form),  # neither Origin nor Referer
            (SAME_ORIGIN, {"id": held}),  # no token
            (SAME_ORIGIN, {"id": held, "token": token[:-1] + "x"}),  # not the cookie's
        ]
        for headers, data in refused:
            response = await client.post("/dash/cancel", data=data, headers=headers)
            assert response.status_code == 403, (headers, data)
        client.cookies.clear()  # a token without its cookie (another browser's page)
        response = await client.post("/dash/cancel", data=form, headers=SAME_ORIGIN)
        assert response.status_code == 403
        await trio.testing.wait_all_tasks_blocked()
        state = (await client.get("/dash/state.json", headers=FRESH)).json()
        assert shown_state(state, held) == "running"
        token = await _token(client)  # a new cookie, a new token
        referred = {"referer": "http://test/dash/?outcome=failed"}  # (no Origin: its Referer)
        done = await client.post(
            "/dash/cancel", data={"id": held, "token": token}, headers=referred
        )
        assert (done.status_code, done.headers["location"]) == (303, "/dash/")
        await settled(client, lambda s: shown_state(s, held) == "cancelled")


async def test_another_apps_cookie_in_the_header_does_not_hide_the_token() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        held = await started(client, "held")
        token = await _token(client)
        # http.cookies gives up on a whole header for a value like these.
        cookie = f'prefs={{"theme":"dark"}}; name=Ann Example; trio_bg_dashboard={token}'
        client.cookies.clear()
        done = await client.post(
            "/dash/cancel",
            data={"id": held, "token": token},
            headers={**SAME_ORIGIN, "cookie": cookie, "accept": "application/json"},
        )
        assert (done.status_code, done.json()["done"]) == (200, 1)


async def test_a_message_that_is_not_unicode_text_still_shows() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        held = await started(client, "not-utf-8")
        page = await client.get("/dash/")
        assert page.status_code == 200 and held in page.text
        assert "caf?" in page.text  # (the task's message, its bad character replaced)


def shown_state(state: dict[str, Any], task_id: str) -> str | None:
    """Task ``task_id``'s state as the live or the ended table shows it."""
    for table in ("live", "ended"):
        for row in state["tables"][table]["rows"]:
            if row["key"] == task_id:
                return str(row["cells"][2]["badge"])
    return None


async def test_bad_actions_are_refused_plainly() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        token = await _token(client)
        assert (await client.get("/dash/cancel")).status_code == 405
        assert (await client.post("/dash/state.json", headers=SAME_ORIGIN)).status_code == 405
        for route, data, status in [
            ("/cancel", {"token": token}, 400),  # no id
            ("/cancel", {"token": token, "id": "../../etc"}, 400),
            ("/retry", {"token": token, "id": "1; DROP TABLE tasks"}, 400),
            ("/retry", {"token": token, "id": "²"}, 400),  # a digit, not a number int() reads
            ("/cancel", {"token": token, "id": "x" * 20_000}, 413),
        ]:
            response = await client.post(f"/dash{route}", data=data, headers=SAME_ORIGIN)
            assert response.status_code == status, (route, data)
        unknown = await client.post(
            "/dash/cancel",
            data={"token": token, "id": "0" * 32},
            headers={**SAME_ORIGIN, "accept": "application/json"},
        )
        assert unknown.json()["done"] == 0


async def test_without_a_journal_there_are_no_dead_letters_to_act_on() -> None:
    dashboard = trio_bg.dashboard.app(public=True)
    app = trio_bg.BackgroundTaskMiddleware(
        Starlette(routes=[Mount("/dash", app=dashboard)]), grace_period=0
    )
    async with run_lifespan(app), asgi_client(app) as client:
        token = await _token(client)
        state = (await client.get("/dash/state.json")).json()
        assert state["system"]["backlog"] == "no journal"
        assert "No journal" in state["tables"]["dead"]["note"]
        response = await client.post(
            "/dash/retry", data={"token": token, "id": "1"}, headers=SAME_ORIGIN
        )
        assert response.status_code == 404


# -- cancel, retry, purge ------------------------------------------------------------


def dead_letter(state: dict[str, Any], task_id: str) -> list[Any]:
    """The cells of task ``task_id``'s dead letter."""
    [row] = [row for row in cells(state, "dead") if {"id": task_id} in row]
    return row


async def test_cancel_retry_and_purge_through_the_forms() -> None:
    ran.clear()
    failing.clear()
    failing.update({"ann@example.com", "bob@example.com"})
    async with dashboard_client(trio_bg.dashboard.app(public=True)) as client:
        held = await started(client, "held")
        ann = await started(client, "charge:ann@example.com")
        bob = await started(client, "charge:bob@example.com")
        state = await settled(client, lambda s: s["system"]["dead"] == "2")
        assert len(cells(state, "dead")) == 2
        name, row_number, _, attempts, error, *_, buttons = dead_letter(state, ann)
        assert (name, attempts) == ("tests.dashboard.charge", 1)
        assert error["text"].startswith("attempt 1: ValueError('no such mailbox")
        assert [verb for verb, _, _ in buttons["do"]] == ["retry", "purge"]
        assert "Arguments" not in str(state)

        token = await _token(client)

        async def act(route: str, id: str) -> httpx.Response:
            form = {"id": id, "token": token}
            return await client.post(f"/dash/{route}", data=form, headers=SAME_ORIGIN)

        cancelled = await act("cancel", held)
        assert (cancelled.status_code, cancelled.headers["location"]) == (303, "/dash/")
        failing.discard("ann@example.com")  # ann's retry passes, by its row number
        retried = await act("retry", str(row_number))
        assert retried.status_code == 303
        purged = await act("purge", bob)
        assert purged.status_code == 303  # bob's goes, by its task id
        state = await settled(
            client, lambda s: s["system"]["dead"] == "0" and s["counts"]["completed"] == 1
        )
        assert sorted(ran) == ["ann@example.com", "ann@example.com", "bob@example.com"]
        ended = {row["key"]: row["cells"][2]["badge"] for row in state["tables"]["ended"]["rows"]}
        assert (ended[held], ended[ann]) == ("cancelled", "completed")
        assert cells(state, "dead") == [] and state["tables"]["dead"]["note"] == ""


async def test_read_only_shows_no_buttons_and_refuses_the_actions() -> None:
    async with dashboard_client(trio_bg.dashboard.app(public=True, read_only=True)) as client:
        held = await started(client, "held")
        page = await client.get("/dash/")
        assert f'data-key="{held}"' in page.text
        assert 'method="post"' not in page.text and ">Actions<" not in page.text
        state = (await client.get("/dash/state.json")).json()
        assert not any(isinstance(cell, dict) and "do" in cell for cell in cells(state, "live")[0])
        token = token_of(page)
        for route in ACTIONS:
            response = await client.post(
                f"/dash{route}", data={"id": held, "token": token}, headers=SAME_ORIGIN
            )
            assert response.status_code == 403
        await trio.testing.wait_all_tasks_blocked()
        state = (await client.get("/dash/state.json", headers=FRESH)).json()
        assert shown_state(state, held) == "running"


async def test_arguments_are_shown_only_with_show_arguments() -> None:
    failing.clear()
    failing.add("<carol@example.com>")
    for show in (False, True):
        dashboard = trio_bg.dashboard.app(public=True, show_arguments=show)
        async with dashboard_client(dashboard) as client:
            carol = await started(client, "charge:<carol@example.com>")
            state = await settled(client, lambda s: s["system"]["dead"] == "1")
            page = (await client.get("/dash/")).text
            dead = page[page.index('data-table="dead"') :]
            assert ("&lt;carol@example.com&gt;" in dead) is show
            assert (">Arguments<" in page) is show
            shown = [c for c in dead_letter(state, carol) if isinstance(c, dict) and "code" in c]
            assert ["<carol@example.com>" in c["code"] for c in shown] == ([True] if show else [])
            assert "carol" not in str(cells(state, "live")) + str(cells(state, "ended"))


async def test_the_starlette_example_mounts_it_for_this_machine_only() -> None:
    from examples.starlette_app import app

    async with run_lifespan(app), asgi_client(app) as local:
        assert (await local.post("/exports")).status_code == 202
        await trio.testing.wait_all_tasks_blocked()  # (its task is handed over, then)
        page = await local.get("/dashboard/")
        assert page.status_code == 200 and "exports.build" in page.text
        remote = httpx.ASGITransport(app=app, client=("203.0.113.9", 4711))
        async with httpx.AsyncClient(transport=remote, base_url="http://test") as elsewhere:
            assert (await elsewhere.get("/dashboard/state.json")).status_code == 403


async def test_it_tells_whether_redis_is_reachable(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_BG_TEST_REDIS", redis_server.url)
    sys.modules.pop("streaq_app", None)
    streaq_app = importlib.import_module("streaq_app")
    dashboard = trio_bg.dashboard.app(public=True)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        inner = dict(scope, root_path="/dash", path=scope["path"].removeprefix("/dash"))
        await dashboard(inner, receive, send)

    served = trio_bg.BackgroundTaskMiddleware(app, grace_period=0, streaq=streaq_app.tasks)
    async with run_lifespan(served), asgi_client(served) as client:
        await settled(client, lambda state: state["system"]["redis"] == "reachable")
        redis_server.stop()
        await settled(client, lambda state: state["system"]["redis"].startswith("unreachable"))
