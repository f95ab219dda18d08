"""The status endpoint (`trio_bg.status.app`): a small ASGI app, mounted in an app the
middleware serves, that answers ``GET /{id}`` with the task's status as JSON (404 for an
id nobody knows) and, where allowed, cancels it on ``DELETE /{id}``."""

from __future__ import annotations

import json
from typing import Any

from .asgi import ASGIApp, Receive, Scope, Send
from .authorization import Authorize, allowed, required_authorize
from .task_lookup import cancel_task, task_status


def app(
    *, authorize: Authorize | None = None, public: bool = False, cancel: bool = False
) -> ASGIApp:
    """An ASGI app answering ``GET /{id}`` with task ``id``'s `TaskStatus` as JSON
    (`TaskStatus.as_dict`; 404 for an unknown id), and, with ``cancel=True``,
    ``DELETE /{id}`` with `cancel_task`'s answer (``{"cancelled": bool}``).

    Mount it in an app served by `BackgroundTaskMiddleware` (any framework, any
    path: the id is the last segment). A status can show a task's result and error,
    so it refuses to be made (`ValueError`) without ``authorize`` (given each
    request's ASGI scope, it returns a bool or an awaitable bool: False answers
    403) or ``public=True``.
    """
    authorize = required_authorize(
        authorize, public=public, app="trio_bg.status.app()", shows="task results and errors"
    )
    if not isinstance(cancel, bool):
        raise TypeError(f"cancel must be True or False, not {cancel!r}")
    methods = ("GET", "HEAD", "DELETE") if cancel else ("GET", "HEAD")

    async def status_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"trio_bg.status.app() serves HTTP only, not {scope['type']!r}")
        method = scope["method"]
        if method not in methods:
            await _answer(send, 405, {"error": "method not allowed"}, allow=methods)
            return
        if not await allowed(authorize, scope):
            await _answer(send, 403, {"error": "forbidden"})
            return
        task_id = _last_segment(scope)
        if method == "DELETE":
            cancelled = await cancel_task(task_id)
            status = await task_status(task_id)
            if status is None and not cancelled:
                await _answer(send, 404, {"error": "no task has this id", "id": task_id})
                return
            await _answer(send, 200, {"cancelled": cancelled, "id": task_id})
            return
        status = await task_status(task_id)
        if status is None:
            await _answer(send, 404, {"error": "no task has this id", "id": task_id})
            return
        await _answer(send, 200, status.as_dict(), head=method == "HEAD")

    return status_app


def _last_segment(scope: Scope) -> str:
    """The id: what follows the mount's prefix (a mount that keeps the full path, as
    Starlette's does, puts the prefix in ``root_path``), up to the next slash."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.strip("/").split("/")[-1] if path.strip("/") else ""


async def _answer(
    send: Send,
    status: int,
    body: dict[str, Any],
    *,
    allow: tuple[str, ...] = (),
    head: bool = False,
) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if allow:
        headers.append((b"allow", ", ".join(allow).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else data})
