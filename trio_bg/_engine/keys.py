"""Deduplication keys: what makes a call's key of a task's ``key=`` (a `str.format`
template over the call's arguments by parameter name, or a function of them)."""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable
from functools import partial
from typing import Any

KeyMaker = Callable[[tuple[Any, ...], dict[str, Any]], str]
"""A call's deduplication key, made of its ``(args, kwargs)``."""


def key_maker(func: object, key: str | Callable[..., str], name: str) -> KeyMaker:
    """What makes a call's deduplication key of ``key`` (`TypeError` for a template
    naming a parameter that ``func``, the task ``name``, does not have)."""
    if not isinstance(key, str):
        return partial(_key_of_function, key)
    try:
        signature = inspect.signature(func)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"a key template needs a function with a signature, not {func!r}") from None
    for _, field, _, _ in string.Formatter().parse(key):
        if field is None:
            continue
        parameter = field.split(".", 1)[0].split("[", 1)[0]
        if parameter not in signature.parameters:
            raise TypeError(f"key {key!r} names {parameter!r}, which is not a parameter of {name}")
    return partial(_key_of_template, key, signature)


def _key_of_template(
    template: str, signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    bound = signature.bind(*args, **kwargs)  # (the call was checked already)
    bound.apply_defaults()
    try:
        return template.format_map(bound.arguments)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise TypeError(f"add_task(): key {template!r} cannot be made: {error!r}") from None


def _key_of_function(
    key: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    value = key(*args, **kwargs)
    if not isinstance(value, str):
        raise TypeError(f"add_task(): a task's key function must return a str, not {value!r}")
    return value
