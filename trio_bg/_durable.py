"""Durable task functions: found again by their registered name only, their arguments
stored as JSON (never pickle), so a journal row can never name code to import or run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

# The durable task functions of this process, by name. Like Python's codec registry,
# this is a table of code filled in at import time (by @trio_bg.task(durable=True)),
# not runtime state: nothing here changes while tasks run.
_registry: dict[str, Callable[..., Any]] = {}

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def register(name: str, func: Callable[..., Any]) -> None:
    """Make ``func`` the durable task called ``name``; `ValueError` if another function
    has that name already (the same function imported again replaces itself)."""
    known = _registry.get(name)
    if known is not None and known is not func and _definition(known) != _definition(func):
        raise ValueError(
            f"two durable tasks are named {name!r}: {_definition(known)} and "
            f"{_definition(func)}; a durable task's name must be unique, since the "
            f"journal finds the function by that name alone"
        )
    _registry[name] = func


def registered(name: str) -> Callable[..., Any] | None:
    """The durable task function called ``name``, if this process has one."""
    return _registry.get(name)


def registered_names() -> list[str]:
    """The names of this process's durable tasks."""
    return list(_registry)


def encode_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``args`` and ``kwargs`` of durable task ``name`` as the JSON text a journal row
    keeps (see `encode_parts`)."""
    return "[{},{}]".format(*encode_parts(name, args, kwargs, kind="durable task"))


def encode_parts(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, kind: str
) -> tuple[str, str]:
    """The JSON of ``args`` (as a list) and of ``kwargs``; `TypeError`, naming the
    argument, if one is not JSON or would come back as something else (``kind``: what
    the task is, for the message)."""
    try:
        parts = _encoder.encode(args), _encoder.encode(kwargs)
    except (TypeError, ValueError):
        parts = None
    if parts is not None and all(map(_comes_back, args)) and all(map(_comes_back, kwargs.values())):
        return parts  # (the common case, checked without decoding)
    if parts is None or [json.loads(part) for part in parts] != [list(args), kwargs]:
        for label, value in _labelled(args, kwargs):
            problem = _json_problem(value)
            if problem is not None:
                raise TypeError(
                    f"add_task(): {label} of {kind} {name} {problem}: a {kind}'s "
                    f"arguments are kept as JSON, so pass str, int, float, bool, "
                    f"None, and lists and dicts (with str keys) of them"
                ) from None
        raise TypeError(f"add_task(): the arguments of {kind} {name} are not JSON")
    return parts


_SCALARS = (str, int, bool, type(None))


def _comes_back(value: object) -> bool:
    """Whether ``value`` surely comes back from JSON as itself (False: find out)."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind is list:
        return all(map(_comes_back, value))  # type: ignore[call-overload]
    if kind is dict:
        return all(type(key) is str and _comes_back(item) for key, item in value.items())  # type: ignore[attr-defined]
    return False


def decode_arguments(text: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` that `encode_arguments` turned into ``text``."""
    args, kwargs = json.loads(text)
    return tuple(args), kwargs


def _labelled(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for position, value in enumerate(args, 1):
        yield f"argument {position}", value
    for keyword, value in kwargs.items():
        yield f"argument {keyword!r}", value


def _json_problem(value: object) -> str | None:
    """Why ``value`` cannot be a JSON argument (its type, never the value itself:
    arguments may hold personal data), or None if it can."""
    try:
        text = _encoder.encode(value)
    except ValueError:
        return "is not JSON (a float that is NaN or infinite)"
    except TypeError:
        return f"is not JSON (it holds a {type(_first_unencodable(value)).__name__})"
    if json.loads(text) != value:
        return (
            f"would come back from JSON as something else "
            f"(a {type(value).__name__} holding a tuple, or int dict keys, say)"
            if isinstance(value, list | dict)
            else f"would come back from JSON as a {type(json.loads(text)).__name__}, "
            f"not a {type(value).__name__}"
        )
    return None


def _first_unencodable(value: object) -> object:
    """The innermost part of ``value`` that JSON cannot encode."""
    parts: list[Any] = []
    if isinstance(value, dict):
        parts = [key for key in value if not isinstance(key, str | int | float | bool)]
        parts += list(value.values())
    elif isinstance(value, list | tuple):
        parts = list(value)
    for part in parts:
        try:
            _encoder.encode(part)
        except (TypeError, ValueError):
            return _first_unencodable(part)
    return value


def _definition(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}"


def needs_a_journal(name: str, where: str) -> RuntimeError:
    """The error for a durable task added where no journal keeps it."""
    return RuntimeError(
        f"{name} is a durable task, and {where}: configure one with "
        f"journal='path/tasks.db' (BackgroundTaskMiddleware, trio_bg.serve, "
        f"open_background_nursery, the integrations; --journal on the command line), "
        f"or journal=':memory:' in tests"
    )
