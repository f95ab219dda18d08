"""The ASGI types trio_bg speaks, and what it says about a connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def expect(receive: Receive, kind: str) -> None:
    """Receive the next message, which must be of ``kind`` (`RuntimeError` if not)."""
    message = await receive()
    if message["type"] != kind:
        raise RuntimeError(f"expected an ASGI {kind} message, got {message['type']}")


def describe(scope: Scope) -> str:
    """A request, for log lines: its kind and path, never its query or body."""
    return f"the {scope['type']} request to {scope.get('path', '?')}"
