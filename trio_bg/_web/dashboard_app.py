"""The dashboard (`trio_bg.dashboard.app`): a small ASGI app, mounted in an app the
middleware serves, showing the nursery that serves it, live, and acting on its tasks.

Routes, under its mount: ``GET /`` the page (rendered on the server), ``GET
/state.json`` what it shows (its script fetches it every second, with ``If-None-Match``),
``GET /dashboard.css`` and ``/dashboard.js``, and the actions, ``POST /cancel``,
``/retry`` and ``/purge`` (form fields ``token`` and ``id``, repeatable).

An action must come from the dashboard's own page: its ``Origin`` (or, without one,
its ``Referer``) must be the request's own host, and its ``token`` the one in the
dashboard's cookie (double submit: the page sets a random token in an ``HttpOnly``,
``SameSite=Strict`` cookie for its path, and puts the same in its forms). The token
needs no state on the server, so it holds across workers and restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

from .._engine.status import looks_like_id
from .._running.nursery import journal_of, retry_dead_letters
from .asgi import ASGIApp, Receive, Scope, Send
from .authorization import Authorize, allowed, required_authorize
from .dashboard_data import ENDED_STATES, View, look
from .dashboard_page import render
from .task_lookup import serving_nursery

COOKIE = "trio_bg_dashboard"
"""The cookie that holds the token the dashboard's forms must send."""

FRESH_FOR = 0.5
"""Seconds a look is served again to every page that asks for it (ten open pages cost
one look per this, not ten), unless an action was taken meanwhile. A page load, or a
request with ``Cache-Control: no-cache``, gets a new one."""

BODY_LIMIT = 16_384
"""Bytes an action's form may have, at most."""

IDS_LIMIT = 100
"""Ids one action may name, at most."""

ACTIONS = ("cancel", "retry", "purge")

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def app(
    *,
    authorize: Authorize | None = None,
    public: bool = False,
    read_only: bool = False,
    show_arguments: bool = False,
) -> ASGIApp:
    """An ASGI app showing the nursery that serves it (see `docs/dashboard.md`).

    Mount it in an app served by `BackgroundTaskMiddleware` (any framework, any
    path). A task list can hold personal data, so it refuses to be made (`ValueError`)
    without ``authorize`` (given each request's ASGI scope, it returns a bool or an
    awaitable bool: False answers 403; every route asks it, the live updates too) or
    ``public=True``. ``read_only=True`` shows no buttons and refuses the actions;
    ``show_arguments=True`` shows the dead letters' arguments (never shown otherwise).
    From its first request on, the nursery records per-name run and wait times.
    """
    authorize = required_authorize(
        authorize,
        public=public,
        app="trio_bg.dashboard.app()",
        shows="task names, messages and errors",
    )
    for name, value in (("read_only", read_only), ("show_arguments", show_arguments)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, not {value!r}")
    return _Dashboard(authorize, read_only=read_only, show_arguments=show_arguments)


class _Dashboard:
    """The app `app` returns (see the module)."""

    def __init__(self, authorize: Authorize | None, *, read_only: bool, show_arguments: bool):
        self._authorize = authorize
        self._read_only = read_only
        self._show_arguments = show_arguments
        assets = resources.files(__package__).joinpath("dashboard_assets")
        self._files = {
            f"/{name}": (kind, assets.joinpath(name).read_bytes())
            for name, kind in (
                ("dashboard.css", b"text/css; charset=utf-8"),
                ("dashboard.js", b"text/javascript; charset=utf-8"),
            )
        }
        digest = hashlib.blake2b(digest_size=6)
        for _, content in self._files.values():
            digest.update(content)
        self._version = digest.hexdigest()
        # The latest looks, by (nursery, filter): (taken at, JSON without "now", ETag).
        self._looks: dict[tuple[int, View], tuple[float, str, str]] = {}
        self._generation = 0  # actions done: a look begun before the last is not kept

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"trio_bg.dashboard.app() serves HTTP only, not {scope['type']!r}")
        if not await allowed(self._authorize, scope):
            await _text(send, 403, "Forbidden: the dashboard's authorize refused this request.")
            return
        path, method = _path(scope), scope["method"]
        if path.lstrip("/") in ACTIONS:
            if method != "POST":
                await _text(send, 405, "Use POST.", allow=b"POST")
            elif self._read_only:
                await _text(send, 403, "Forbidden: this dashboard is read-only.")
            else:
                await self._act(path.lstrip("/"), scope, receive, send)
            return
        if method not in ("GET", "HEAD"):
            await _text(send, 405, "Use GET.", allow=b"GET, HEAD")
            return
        head = method == "HEAD"
        if path in ("", "/"):
            await self._page(scope, send, head=head)
        elif path == "/state.json":
            await self._state(scope, send, head=head)
        elif path in self._files:
            kind, content = self._files[path]
            headers = [(b"content-type", kind), (b"cache-control", b"private, max-age=86400")]
            await _send(send, 200, headers, content, head=head)
        else:
            await _text(send, 404, "Not found.")

    # -- looking -------------------------------------------------------------------

    def _view(self, scope: Scope) -> View:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        name = (query.get("name") or [""])[0][:200] or None
        outcome = (query.get("outcome") or [""])[0]
        return View(
            read_only=self._read_only,
            show_arguments=self._show_arguments,
            name=name,
            outcome=outcome if outcome in ENDED_STATES else None,
        )

    async def _look(self, view: View, *, fresh: bool) -> tuple[str, str]:
        """A look at the serving nursery, as JSON without ``now``, and its ETag: a new
        one if ``fresh``, else perhaps one taken less than `FRESH_FOR` ago."""
        if not fresh:
            key = (id(serving_nursery("trio_bg.dashboard.app()")), view)
            kept = self._looks.get(key)
            if kept is not None and trio.current_time() - kept[0] < FRESH_FOR:
                return kept[1], kept[2]
        _, data, etag = await self._new_look(view)
        return data, etag

    async def _new_look(self, view: View) -> tuple[dict[str, Any], str, str]:
        """A new look at the serving nursery (kept for the pages that ask within
        `FRESH_FOR`): what it shows, as JSON without ``now``, and its ETag."""
        nursery = serving_nursery("trio_bg.dashboard.app()")
        generation = self._generation
        state = await look(nursery, view)
        data = json.dumps({k: v for k, v in state.items() if k != "now"}, separators=(",", ":"))
        etag = '"' + hashlib.blake2b(data.encode(), digest_size=9).hexdigest() + '"'
        if generation == self._generation:  # (no action ended while it looked)
            if len(self._looks) >= 16:  # (a filter per page: few, but bounded)
                self._looks.clear()
            self._looks[id(nursery), view] = (trio.current_time(), data, etag)
        return state, data, etag

    async def _page(self, scope: Scope, send: Send, *, head: bool) -> None:
        view = self._view(scope)
        state, _, etag = await self._new_look(view)
        token, cookie = _token(scope)
        root = scope.get("root_path", "").rstrip("/")
        page = render(state, root=root, token=token, etag=etag, view=view, assets=self._version)
        headers = [(b"content-type", b"text/html; charset=utf-8"), *SECURITY_HEADERS]
        if cookie:
            secure = "; Secure" if scope.get("scheme") == "https" else ""
            attributes = f"Path={root or '/'}; HttpOnly; SameSite=Strict{secure}"
            headers.append((b"set-cookie", f"{COOKIE}={token}; {attributes}".encode()))
        # (A task's text may hold a lone surrogate, as a file name read from the disk can.)
        await _send(send, 200, headers, page.encode("utf-8", "replace"), head=head)

    async def _state(self, scope: Scope, send: Send, *, head: bool) -> None:
        fresh = "no-cache" in (_header(scope, b"cache-control") or "")
        data, etag = await self._look(self._view(scope), fresh=fresh)
        headers = [
            (b"content-type", b"application/json"),
            (b"etag", etag.encode()),
            *SECURITY_HEADERS,
        ]
        if _header(scope, b"if-none-match") == etag:
            await _send(send, 304, headers, b"", head=True)
            return
        body = f'{{"now":{time.time():.3f},{data[1:]}'
        await _send(send, 200, headers, body.encode(), head=head)

    # -- acting --------------------------------------------------------------------

    async def _act(self, action: str, scope: Scope, receive: Receive, send: Send) -> None:
        if not _same_origin(scope):
            await _text(send, 403, "Forbidden: a cross-site request (Origin is not this host).")
            return
        form = await _form(receive)
        if form is None:
            await _text(send, 413, "The form is too large.")
            return
        cookie = _cookie(scope)
        sent = (form.get("token") or [""])[0]
        if not cookie or not hmac.compare_digest(sent.encode(), cookie.encode()):
            await _text(send, 403, "Forbidden: a missing or wrong token; reload the page.")
            return
        ids = form.get("id", [])
        if not ids or len(ids) > IDS_LIMIT:
            await _text(send, 400, f"Name 1 to {IDS_LIMIT} ids.")
            return
        nursery = serving_nursery("trio_bg.dashboard.app()")
        if action == "cancel":
            if not all(looks_like_id(id) for id in ids):
                await _text(send, 400, "A task id is 32 hexadecimal digits.")
                return
            done = sum([await nursery.cancel_task(id) for id in ids])
        else:
            journal = journal_of(nursery)
            rows = _row_ids(ids)
            if journal is None:
                await _text(send, 404, "There is no journal: durable tasks are not configured.")
                return
            if rows is None:
                await _text(send, 400, "A dead letter's id is its row number or its task id.")
                return
            if action == "retry":
                done = await retry_dead_letters(nursery, rows)
            else:
                done = await journal.purge(rows)
        # The next look shows what this did (not one taken while it was being done).
        self._generation += 1
        self._looks.clear()
        if "application/json" in (_header(scope, b"accept") or ""):
            body = json.dumps({"action": action, "ids": ids, "done": done}).encode()
            await _send(
                send, 200, [(b"content-type", b"application/json"), *SECURITY_HEADERS], body
            )
            return
        back = (scope.get("root_path", "").rstrip("/") + "/").encode()
        await _send(send, 303, [(b"location", back), (b"cache-control", b"no-store")], b"")


def _row_ids(ids: list[str]) -> list[int | str] | None:
    """Dead letters' ids as the journal takes them: row numbers (int) or task ids;
    None if one is neither."""
    rows: list[int | str] = []
    for id in ids:
        if id.isascii() and id.isdecimal() and len(id) < 19:
            rows.append(int(id))
        elif looks_like_id(id):
            rows.append(id)
        else:
            return None
    return rows


def _path(scope: Scope) -> str:
    """The path under the mount: a mount that keeps the full path (as Starlette's does)
    has the prefix in ``root_path`` too; one that strips it, not."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :]
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _cookie(scope: Scope) -> str | None:
    """The token in the dashboard's cookie, if the request has one. (Read by hand:
    `http.cookies` drops every cookie of a header when one of them is not to its taste,
    such as another app's JSON value.)"""
    found = None
    for key, value in scope["headers"]:
        if key == b"cookie":
            for pair in bytes(value).decode("latin-1").split(";"):
                name, _, content = pair.strip().partition("=")
                if name == COOKIE:
                    found = content.strip().strip('"')
    return found


def _token(scope: Scope) -> tuple[str, bool]:
    """The token for the page's forms: the cookie's, or a new one (True: set it)."""
    token = _cookie(scope)
    if token and len(token) == 43 and token.replace("-", "").replace("_", "").isalnum():
        return token, False
    return secrets.token_urlsafe(32), True


def _same_origin(scope: Scope) -> bool:
    """Whether the request's ``Origin`` (or ``Referer``, without one) is its own host."""
    host = _header(scope, b"host")
    source = _header(scope, b"origin") or _header(scope, b"referer")
    if not host or not source or source == "null":
        return False
    return urlsplit(source).netloc.lower() == host.lower()


async def _form(receive: Receive) -> dict[str, list[str]] | None:
    """The request's urlencoded form; None when it passes `BODY_LIMIT` (the rest is
    read and dropped, up to 64 times that, so that the connection can serve on)."""
    body = bytearray()
    size = 0
    while size <= 64 * BODY_LIMIT:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= BODY_LIMIT:
            body += chunk
        if not message.get("more_body", False):
            break
    return None if size > BODY_LIMIT else parse_qs(body.decode("utf-8", "replace"))


async def _text(send: Send, status: int, text: str, *, allow: bytes = b"") -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
    if allow:
        headers.append((b"allow", allow))
    await _send(send, status, headers, text.encode("utf-8", "replace"))


async def _send(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, head: bool = False
) -> None:
    if status != 304:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
