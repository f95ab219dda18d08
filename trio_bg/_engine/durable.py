"""Durable task functions: found again by their registered name only, their arguments
stored as JSON (never pickle), so a journal row can never name code to import or run."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# The durable task functions of this process, by name. Like Python's codec registry,
# this is a table of code filled in at import time (by @trio_bg.task(durable=True)),
# not runtime state: nothing here changes while tasks run.
_registry: dict[str, Callable[..., Any]] = {}

# ASCII: a str may hold lone surrogates (json.loads makes one of "\ud800" in a request
# body), which UTF-8 cannot; escaped, they come back as they were. It costs no time.
_encoder = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


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
    except (TypeError, ValueError, RecursionError):
        parts = None
    if parts is not None and _come_back(args) and _come_back(kwargs.values()):
        return parts  # (the common case, checked without decoding)
    if parts is None or _changed(parts, [list(args), kwargs]):
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


def _come_back(values: Iterable[object]) -> bool:
    """Whether ``values`` surely come back from JSON as themselves (False: find out).
    A loop, not a recursion: arguments may nest deeper than Python's stack."""
    unseen = list(values)
    while unseen:
        value = unseen.pop()
        if type(value) in _SCALARS:
            continue
        if type(value) is float:
            if not math.isfinite(value):
                return False
        elif type(value) is list:
            unseen += value
        elif type(value) is dict and all(type(key) is str for key in value):
            unseen += value.values()
        else:
            return False
    return True


def _changed(parts: tuple[str, str], original: list[object]) -> bool:
    """Whether ``parts`` decode to something other than ``original``."""
    try:
        return [json.loads(part) for part in parts] != original
    except RecursionError:  # nested too deeply to compare: _json_problem finds where
        return True


def decode_arguments(text: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` that `encode_arguments` turned into ``text``; `ValueError`
    (which never quotes it) if it holds anything else."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("its arguments are JSON nested too deep") from None
    except ValueError as error:  # (JSONDecodeError says where, not what)
        raise ValueError(f"its arguments are not JSON ({error})") from None
    match value:
        case [list() as args, dict() as kwargs]:
            return tuple(args), kwargs
    raise ValueError("its arguments are not JSON of the form [args, kwargs]")


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
    except RecursionError:
        return _TOO_DEEP
    except ValueError:  # NaN or infinite, an int too long for text, or a cycle
        part = _first_unencodable(value)
        if isinstance(part, float):
            return "is not JSON (a float that is NaN or infinite)"
        if isinstance(part, int):
            return f"is not JSON (an int of over {sys.get_int_max_str_digits()} digits)"
        return f"is not JSON (a {type(part).__name__} that holds itself)"
    except TypeError:
        return f"is not JSON (it holds a {type(_first_unencodable(value)).__name__})"
    try:
        back = json.loads(text)
        changed = back != value
    except RecursionError:
        return _TOO_DEEP
    if changed:
        return (
            f"would come back from JSON as something else "
            f"(a {type(value).__name__} holding a tuple, or int dict keys, say)"
            if isinstance(value, list | dict)
            else f"would come back from JSON as a {type(back).__name__}, "
            f"not a {type(value).__name__}"
        )
    return None


_TOO_DEEP = "is not JSON (it is nested too deeply)"


def _first_unencodable(value: object) -> object:
    """The innermost part of ``value`` that JSON cannot encode (for a cycle, the
    container that holds itself). A loop, not a recursion: see `_come_back`."""
    seen: set[int] = set()
    while id(value) not in seen:
        seen.add(id(value))
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str | int | float | bool | None):
                    return key
            parts: list[Any] = [*value, *value.values()]
        elif isinstance(value, list | tuple):
            parts = list(value)
        else:
            return value
        for part in parts:
            try:
                _encoder.encode(part)
            except (TypeError, ValueError, RecursionError):
                value = part
                break
        else:
            return value
    return value


def _definition(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}"
