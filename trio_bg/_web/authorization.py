"""Who may use the mountable apps that show task data (the status endpoint, the
dashboard, the metrics): an ``authorize`` callable, checked when the app is made and
asked on every request."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from .asgi import Scope

Authorize = Callable[[Scope], bool | Awaitable[bool]]
"""``authorize(scope)``: whether the request may go on (a bool, or an awaitable bool)."""


def checked_authorize(authorize: Authorize | None) -> Authorize | None:
    """``authorize``, checked when an app is made: a `TypeError` if it is not callable."""
    if authorize is not None and not callable(authorize):
        raise TypeError(f"authorize must be callable, not {authorize!r}")
    return authorize


def required_authorize(
    authorize: Authorize | None, *, public: bool, app: str, shows: str
) -> Authorize | None:
    """`checked_authorize`, for an ``app`` that shows task data (``shows`` says what):
    a `ValueError` if there is no ``authorize`` and it is not made ``public``."""
    if not isinstance(public, bool):
        raise TypeError(f"public must be True or False, not {public!r}")
    if authorize is None and not public:
        raise ValueError(
            f"{app} shows {shows}: give it authorize=callable(scope) -> bool, or "
            f"public=True to show them to anyone"
        )
    return checked_authorize(authorize)


async def allowed(authorize: Authorize | None, scope: Scope) -> bool:
    """Whether ``authorize`` lets this request go on (anything but True is a no)."""
    if authorize is None:
        return True
    verdict = authorize(scope)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict is True
