"""What the command line reads: ``module:attribute`` specs, and numbers with bounds."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys


def load_attribute(spec: str, *, what: str, default: str | None = None) -> object:
    """Import ``module:attribute`` (``default`` when the attribute is left out), with
    the current directory on ``sys.path`` as Hypercorn does; `LookupError` saying what
    is wrong (``what``: "app", "worker"), or the import's own error for a module the
    target's code imports."""
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or default or ""
    if not module_name or not attribute:
        raise LookupError(f"cannot load {spec!r}: give the {what} as module:attribute")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name and not module_name.startswith(f"{error.name}."):
            raise  # a module the target's own code imports is missing: show the traceback
        raise LookupError(f"cannot load {spec!r}: no module named {error.name!r}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LookupError(f"cannot load {spec!r}: {module_name} has no {attribute!r}") from None
    return target


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value
