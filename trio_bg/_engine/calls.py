"""What can run as a background task: each callable is checked once, each call cheaply.

Checking a call against ``inspect.signature`` costs more than spawning a trio task,
so, as attrs does for ``__init__``, the first sight of a function compiles a no-op
*probe* with the same parameters; calling the probe checks a call's arguments at the
speed of any Python call, with CPython's own error messages.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, final, overload

from .durable import register, registered
from .keys import KeyMaker, key_maker


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long a task waits before each retry: exponential, capped, with jitter.

    Retry ``n`` (1 for the first) waits ``initial * factor ** (n - 1)`` seconds, at most
    ``maximum``, less a random part of up to ``jitter`` of it: with the default 0.1, a
    delay of 8 s becomes one between 7.2 s and 8 s. ``jitter=1`` is "full jitter" (any
    wait up to the delay); ``jitter=0`` makes the waits exact.
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name in ("initial", "factor", "maximum", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Backoff {name} must be a number, not {value!r}")
        if not (self.initial >= 0 and math.isfinite(self.initial)):
            raise ValueError(f"Backoff initial must be finite and >= 0, not {self.initial!r}")
        if not (self.factor >= 1 and math.isfinite(self.factor)):
            raise ValueError(f"Backoff factor must be finite and >= 1, not {self.factor!r}")
        if not (self.maximum >= self.initial and math.isfinite(self.maximum)):
            raise ValueError(
                f"Backoff maximum must be finite and >= initial ({self.initial!r}), "
                f"not {self.maximum!r}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff jitter must be between 0 and 1, not {self.jitter!r}")

    def delay(self, retry: int, draw: float) -> float:
        """The wait, in seconds, before retry number ``retry`` (1 for the first), for a
        ``draw`` in [0, 1) (the nursery draws with `random.random`): 0 gives the full
        delay, draws near 1 take nearly ``jitter`` of it off."""
        try:
            delay = min(self.maximum, self.initial * self.factor ** (retry - 1))
        except OverflowError:  # factor ** (retry - 1) is past any float
            delay = self.maximum if self.initial else 0.0
        return delay * (1 - self.jitter * draw)


_DEFAULT_BACKOFF = Backoff()

DEFAULT_CRASH_LIMIT = 3
"""Attempts a durable task without as many retries may have whose runs die with their
process (see `task`)."""


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What `task` attaches to a function."""

    name: str | None = None
    timeout: float | None = None
    retries: int = 0
    backoff: Backoff = _DEFAULT_BACKOFF
    durable: bool = False
    crash_limit: int = DEFAULT_CRASH_LIMIT
    key: str | Callable[..., str] | None = None
    key_ttl: float | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not (isinstance(self.name, str) and self.name):
            raise TypeError(f"a task name must be a non-empty str, not {self.name!r}")
        if not isinstance(self.durable, bool):
            raise TypeError(f"durable must be True or False, not {self.durable!r}")
        if self.durable and self.name is None:
            raise TypeError(
                "a durable task needs a stable name, such as "
                "@trio_bg.task(name='emails.welcome', durable=True): the journal finds "
                "the function by that name when it replays the task, after a restart"
            )
        timeout = self.timeout
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(f"timeout must be finite and > 0, not {timeout!r}")
        retries = self.retries
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int, not {retries!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries!r}")
        crash_limit = self.crash_limit
        if isinstance(crash_limit, bool) or not isinstance(crash_limit, int):
            raise TypeError(f"crash_limit must be an int, not {crash_limit!r}")
        if crash_limit < 1:
            raise ValueError(f"crash_limit must be >= 1, not {crash_limit!r}")
        if not isinstance(self.backoff, Backoff):
            raise TypeError(
                f"backoff must be a trio_bg.Backoff, such as Backoff(initial=0.5), "
                f"not {self.backoff!r}"
            )
        if self.key is not None and not (isinstance(self.key, str) or callable(self.key)):
            raise TypeError(
                f"key must be a str.format template such as 'charge:{{order_id}}', or a "
                f"function of the task's arguments returning a str, not {self.key!r}"
            )
        key_ttl = self.key_ttl
        if key_ttl is not None:
            if self.key is None:
                raise TypeError("key_ttl keeps a deduplication key: it needs a key")
            if isinstance(key_ttl, bool) or not isinstance(key_ttl, int | float):
                raise TypeError(f"key_ttl must be a number of seconds, not {key_ttl!r}")
            if not (key_ttl >= 0 and math.isfinite(key_ttl)):
                raise ValueError(f"key_ttl must be finite and >= 0, not {key_ttl!r}")


F = TypeVar("F", bound=Callable[..., Any])
_OPTIONS_ATTRIBUTE = "__trio_bg_task__"


@overload
def task(func: F, /) -> F: ...
@overload
def task(
    *,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    backoff: Backoff = _DEFAULT_BACKOFF,
    durable: bool = False,
    crash_limit: int = DEFAULT_CRASH_LIMIT,
    key: str | Callable[..., str] | None = None,
    key_ttl: float | None = None,
) -> Callable[[F], F]: ...
def task(
    func: F | None = None,
    /,
    *,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    backoff: Backoff = _DEFAULT_BACKOFF,
    durable: bool = False,
    crash_limit: int = DEFAULT_CRASH_LIMIT,
    key: str | Callable[..., str] | None = None,
    key_ttl: float | None = None,
) -> F | Callable[[F], F]:
    """Give a task function a stable ``name``, a ``timeout`` (seconds), and ``retries``.

    Use it bare (``@trio_bg.task``) or with options (``@trio_bg.task(timeout=30)``).
    The function itself is returned unchanged, so it can still be called directly.
    A task that outlives its timeout is cancelled (a thread task is abandoned) and
    counted as ``timed_out``. A task that raises an `Exception` or times out runs
    again, up to ``retries`` more times, each after a wait given by ``backoff`` (a
    `Backoff`); only its last attempt's failure or timeout is its outcome.

    A ``durable`` task (it needs a ``name``) is written to the nursery's journal
    before the response that added it completes, and runs at least once, even across
    a crash: its arguments must be JSON, and it is found again by its name alone.
    A durable task's run cut short by the death of its process (a crash, an OOM kill,
    a deploy that kills it) counts as an attempt: once its process has died during
    attempt ``max(retries + 1, crash_limit)`` (``crash_limit`` is 3 by default), it
    becomes a dead letter instead of running again, so that a task that kills its
    process cannot crash-loop the server.

    A deduplication ``key`` (a `str.format` template over the call's arguments by
    parameter name, such as ``"charge:{order_id}"``, or a function of the task's
    arguments returning a str) gives the task an id derived from its name and key:
    while a task with that id is pending, running, retrying or deferred, adding
    another returns its `TaskHandle` and adds nothing (counted ``deduplicated``).
    ``key_ttl`` (seconds) keeps the key, and so the ended task's status, that much
    longer, so that a retried request finds the first task instead of running a
    second.
    """
    options = TaskOptions(
        name=name,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        durable=durable,
        crash_limit=crash_limit,
        key=key,
        key_ttl=key_ttl,
    )

    def attach(func: F) -> F:
        if not callable(func):
            raise TypeError(f"@trio_bg.task decorates a function, not {func!r}")
        if options.durable:
            assert options.name is not None
            if isinstance(func, functools.partial | types.MethodType):
                raise TypeError(
                    f"a durable task is a function (or another callable the journal can "
                    f"call by name), not {func!r}: what a partial or a bound method "
                    f"holds cannot be kept as JSON"
                )
            register(options.name, func)
        if options.key is not None:  # a template naming no parameter: TypeError now
            target = getattr(func, "fn", func) if _is_streaq_task(func) else func
            key_maker(target, options.key, options.name or name_of(_unwrap_partial(target)))
        setattr(func, _OPTIONS_ATTRIBUTE, options)
        # In case it ran as a task before it was decorated:
        try:
            _specs.pop(func, None)
        except TypeError:  # not hashable (a streaq task): analysed by identity
            _unhashable_specs.pop(id(func), None)
        return func

    return attach if func is None else attach(func)


@final
class CallSpec:
    """What trio_bg knows of one callable, found once and used for every call."""

    __slots__ = (
        "_probe",
        "backoff",
        "crash_limit",
        "durable",
        "is_async",
        "key",
        "key_ttl",
        "name",
        "remote",
        "retries",
        "timeout",
    )

    def __init__(self, func: object) -> None:
        _refuse_what_cannot_run(func)
        target = _unwrap_partial(func)
        self.remote = _streaq_task(func)
        if self.remote is not None:
            # Registered on a streaq worker, it runs there; its timeout and retries are
            # streaq's. Only its call is checked here.
            self.name: str = self.remote.fn_name
            self.is_async = True
            self.timeout: float | None = None
            self.retries = 0
            self.backoff = _DEFAULT_BACKOFF
            self.durable = False
            self.crash_limit = DEFAULT_CRASH_LIMIT
            # A deduplication key (@trio_bg.task(key=...) on the streaq task): the id is
            # made of it, and Redis keeps one task of each id (see Handoff).
            options = options_of(func)
            self.key: KeyMaker | None = None
            if options is not None and options.key is not None:
                self.key = key_maker(self.remote.fn, options.key, self.name)
            self.key_ttl: float | None = None if options is None else options.key_ttl
            self._probe = _make_probe(self.remote.fn, self.name)
            return
        self.is_async = is_async_callable(target)
        options = options_of(func)
        self.name = options.name if options and options.name else name_of(target)
        self.timeout = options.timeout if options else None
        self.retries = options.retries if options else 0
        self.backoff = options.backoff if options else _DEFAULT_BACKOFF
        self.durable = options.durable if options else False
        self.crash_limit = options.crash_limit if options else DEFAULT_CRASH_LIMIT
        self.key = (
            None
            if options is None or options.key is None
            else key_maker(func, options.key, self.name)
        )
        self.key_ttl = options.key_ttl if options else None
        if self.durable and registered(self.name) is not func:
            raise TypeError(
                f"add_task() takes durable task {self.name} itself, with its arguments "
                f"(not a partial or a bound method of it): the journal keeps only its "
                f"name and JSON arguments"
            )
        self._probe = _make_probe(func, self.name)

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise `TypeError` if ``args`` and ``kwargs`` do not fit the callable."""
        if self._probe is not None:
            try:
                self._probe(*args, **kwargs)
            except TypeError as error:
                raise TypeError(f"add_task(): {error}") from None


# Memo of pure analysis, weakly keyed: a function that goes away takes its entry along.
# Bound methods are new objects on every attribute access; their function is the key.
_specs: weakref.WeakKeyDictionary[Any, CallSpec] = weakref.WeakKeyDictionary()
_method_specs: weakref.WeakKeyDictionary[Any, CallSpec] = weakref.WeakKeyDictionary()


# Callables that cannot be hashed (a streaq task is a dataclass), by identity, for as
# long as they live.
_unhashable_specs: dict[int, tuple[weakref.ref[Any], CallSpec]] = {}


def spec_of(func: object) -> CallSpec:
    """The `CallSpec` of ``func``; `TypeError` if it could never run as a task."""
    key: object = func
    specs = _specs
    if isinstance(func, types.MethodType):
        key, specs = func.__func__, _method_specs
    try:
        return specs[key]
    except KeyError:
        pass
    except TypeError:  # not hashable, or not weakly referable
        known = _unhashable_specs.get(id(func))
        if known is not None and known[0]() is func:
            return known[1]
    spec = CallSpec(func)
    try:
        specs[key] = spec
    except TypeError:
        with contextlib.suppress(TypeError):  # not weakly referable: analysed every call
            forget = partial(_forget_unhashable, id(func))
            _unhashable_specs[id(func)] = (weakref.ref(func, forget), spec)
    return spec


def _forget_unhashable(identity: int, _: object) -> None:
    _unhashable_specs.pop(identity, None)


def is_async_callable(func: object) -> bool:
    """Whether calling ``func`` returns a coroutine: an ``async def`` function (or a
    partial of one), or an instance whose class defines ``async def __call__``.

    A class is never async, whatever its ``__call__``: calling a class constructs an
    instance. That is why the call is looked up on the type, as Python does.
    """
    target = _unwrap_partial(func)
    return inspect.iscoroutinefunction(target) or (
        not inspect.isroutine(target)
        and inspect.iscoroutinefunction(getattr(type(target), "__call__", None))  # noqa: B004
    )


def _streaq_task(func: object) -> Any:
    """The streaq ``RegisteredTask`` that ``func`` is, or None; `TypeError` for one that
    a worker could not be handed (a partial of one, a cron job, trio_bg options)."""
    streaq_task = sys.modules.get("streaq.task")  # not imported: no streaq task exists
    if streaq_task is None:
        return None
    target = _unwrap_partial(func)
    if not isinstance(target, streaq_task.RegisteredTask):
        return None
    partial = target is not func
    remote: Any = target  # (streaq's types, unknown to mypy here)
    if partial:
        raise TypeError(
            f"add_task() takes streaq task {remote.fn_name} itself, with its arguments "
            f"(not a partial of it): a worker gets only its name and JSON arguments"
        )
    if remote.crontab is not None:
        raise TypeError(
            f"{remote.fn_name} is a streaq cron job: it runs on its schedule, not by add_task"
        )
    options = options_of(remote)
    if options is not None and _beyond_a_key(options):
        raise TypeError(
            f"{remote.fn_name} is a streaq task: its timeout and retries are streaq's "
            f"(@worker.task(timeout=..., max_tries=...)); @trio_bg.task gives it only a "
            f"deduplication key (key=..., key_ttl=...)"
        )
    return remote


def _beyond_a_key(options: TaskOptions) -> bool:
    """Whether ``options`` set more than a deduplication key (all a remote task takes)."""
    return options != TaskOptions(name=options.name, key=options.key, key_ttl=options.key_ttl)


def _is_streaq_task(func: object) -> bool:
    streaq_task = sys.modules.get("streaq.task")
    return streaq_task is not None and isinstance(func, streaq_task.RegisteredTask)


def _refuse_what_cannot_run(func: object) -> None:
    if inspect.isawaitable(func):
        name = getattr(func, "__qualname__", type(func).__name__)
        if inspect.iscoroutine(func):
            func.close()  # spare the user a second, confusing "never awaited" warning
        raise TypeError(
            f"add_task() takes a function and its arguments, not an awaitable: "
            f"write add_task({name}, ...) instead of add_task({name}(...))"
        )
    if not callable(func):
        raise TypeError(
            f"add_task() takes a callable (an async def or a plain function), "
            f"not {type(func).__name__} {func!r}"
        )
    target = _unwrap_partial(func)
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        raise TypeError(
            f"{name_of(target)} is a generator function: calling it runs none of its body; "
            f"pass an async def or a plain function"
        )


class _Default:
    """Stands for every default value in a probe's source."""

    def __repr__(self) -> str:
        return "_default"


def _make_probe(func: object, name: str) -> Callable[..., None] | None:
    """A no-op function with ``func``'s parameters (None if they cannot be known)."""
    try:
        signature = inspect.signature(func)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # some builtins have no signature to check against
        return None
    default = _Default()
    parameters = [
        parameter.replace(
            annotation=inspect.Parameter.empty,
            default=inspect.Parameter.empty if parameter.default is parameter.empty else default,
        )
        for parameter in signature.parameters.values()
    ]
    plain = signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)
    namespace: dict[str, Any] = {"_default": None}
    exec(f"def probe{plain}: pass", namespace)  # names are identifiers, defaults _default
    probe: Callable[..., None] = namespace["probe"]
    probe.__name__ = probe.__qualname__ = name  # CPython names it in its messages
    return probe


def options_of(func: object) -> TaskOptions | None:
    """The `task` options of ``func``, or of the function a partial wraps."""
    while True:
        options: TaskOptions | None = getattr(func, _OPTIONS_ATTRIBUTE, None)
        if options is not None or not isinstance(func, functools.partial):
            return options
        func = func.func


def _unwrap_partial(func: object) -> object:
    while isinstance(func, functools.partial):
        func = func.func
    return func


def name_of(target: object) -> str:
    """The name a callable reports under by default: its qualified name."""
    name = getattr(target, "__qualname__", None)
    return name if isinstance(name, str) else type(target).__qualname__
